//! `rill certs issue`, `rill grant`, `rill revoke`, `rill grants list`, `rill tokens ...`
//! and `rill whoami`: principals and what they may do.
use std::{path::PathBuf, time::SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rill_replication::{
    access::{Access, Action, Body, Entry, Grant, Incarnation, Record, Resource},
    namespace::ConfigDoc,
};

use super::{Conn, ns::DURATION_UNITS, ns::parse_amount};
use crate::client::Client;

/// Flags of `rill certs issue`.
#[derive(Debug, Args)]
pub(crate) struct IssueArgs {
    /// The principal the certificate names (1..=64 of `[A-Za-z0-9._-]`).
    #[arg(long)]
    name: String,
    /// Directory holding the mesh CA (`ca.pem`, `ca.key`); the certificate is written
    /// there as `<name>.pem` and `<name>.key`.
    #[arg(long, default_value = "certs")]
    dir: PathBuf,
    /// Make a superuser (allowed everything, unless a node refuses superusers).
    #[arg(long)]
    superuser: bool,
}

/// Writes a client certificate for a principal.
pub(crate) fn issue(args: &IssueArgs) -> anyhow::Result<()> {
    let id = rill_transport::certs::issue_principal(&args.dir, &args.name, &args.name, args.superuser)?;
    let kind = if args.superuser { "superuser" } else { "principal" };
    println!("wrote a client certificate for {kind} '{}': {} and {}", args.name, id.cert.display(), id.key.display());
    println!("connect with it: --certs {} --identity {}", args.dir.display(), args.name);
    Ok(())
}

/// A grant on the command line: `PRINCIPAL ACTION RESOURCE`.
#[derive(Debug, Args)]
pub(crate) struct GrantArgs {
    /// Who.
    principal: String,
    /// produce, consume or admin.
    action: Action,
    /// `TENANT` (all its namespaces) or `TENANT/NAMESPACE`.
    resource: String,
    #[command(flatten)]
    conn: Conn,
}

impl GrantArgs {
    fn grant(&self) -> anyhow::Result<Grant> {
        rill_transport::certs::check_principal(&self.principal)?;
        let resource = Resource::parse(&self.resource).map_err(anyhow::Error::msg)?;
        Ok(Grant { principal: self.principal.clone(), action: self.action, resource })
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn random<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(bytes)
}

pub(crate) async fn create(client: &Client, entry: Entry) -> anyhow::Result<Incarnation> {
    let incarnation = Incarnation(u64::from_le_bytes(random()?));
    let signed = client.sign(Body::Create { incarnation, entry }, now_ms())?;
    client.catalogue_edit(signed).await?;
    Ok(incarnation)
}

/// Deletes every live incarnation `matches` picks; errors when there is none.
async fn delete_matching(client: &Client, what: &str, matches: impl Fn(&Entry) -> bool) -> anyhow::Result<usize> {
    let doc = client.ns_get().await?;
    let live: Vec<Incarnation> =
        doc.records().iter().filter(|(_, r)| r.delete.is_none() && matches(r.entry())).map(|(i, _)| *i).collect();
    if live.is_empty() {
        bail!("this node holds no {what}");
    }
    for incarnation in &live {
        let signed = client.sign(Body::Delete { incarnation: *incarnation }, now_ms())?;
        client.catalogue_edit(signed).await?;
    }
    Ok(live.len())
}

/// `rill grant`.
pub(crate) async fn grant(args: GrantArgs) -> anyhow::Result<()> {
    let grant = args.grant()?;
    let incarnation = args.conn.run(async |client| create(client, Entry::Grant(grant.clone())).await).await?;
    println!("granted: {grant} (entry {incarnation})");
    Ok(())
}

/// `rill revoke`.
pub(crate) async fn revoke(args: GrantArgs) -> anyhow::Result<()> {
    let grant = args.grant()?;
    let what = format!("grant '{grant}'");
    let matches = |e: &Entry| matches!(e, Entry::Grant(g) if *g == grant);
    let deleted = args.conn.run(async |client| delete_matching(client, &what, matches).await).await?;
    println!("revoked: {grant} ({deleted} entr{})", if deleted == 1 { "y" } else { "ies" });
    Ok(())
}

/// `rill grants`.
#[derive(Debug, Subcommand)]
pub(crate) enum GrantsCommand {
    /// List the grants this node holds (those the principal may see), and whether each
    /// counts: `revoked`, or `no authority` when its signer is no admin of the resource.
    List(ListArgs),
}

/// Flags of the list commands.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    pub(crate) conn: Conn,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, serde::Serialize)]
struct GrantRow {
    principal: String,
    action: String,
    resource: String,
    status: &'static str,
    signed_by: String,
    entry: String,
}

fn status(record: &Record, counts: bool) -> &'static str {
    match (&record.delete, counts) {
        (Some(_), _) => "revoked",
        (None, true) => "active",
        (None, false) => "no authority",
    }
}

/// The catalogue as the node shows it to this principal, and what its entries allow.
pub(crate) async fn catalogue(client: &Client) -> anyhow::Result<(ConfigDoc, Access)> {
    let doc = client.ns_get().await?;
    let access = Access::of(doc.records());
    Ok((doc, access))
}

/// Prints `rows` as one JSON array, or as a table through `line` under `header`.
pub(crate) fn print_rows<R: serde::Serialize>(
    rows: &[R],
    json: bool,
    header: &str,
    line: impl Fn(&R) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(rows)?);
        return Ok(());
    }
    println!("{header}");
    for r in rows {
        println!("{}", line(r));
    }
    Ok(())
}

/// `rill grants list`.
pub(crate) async fn grants(cmd: GrantsCommand) -> anyhow::Result<()> {
    let GrantsCommand::List(ListArgs { conn, json }) = cmd;
    let (doc, access) = conn.run(catalogue).await?;
    let rows: Vec<GrantRow> = doc
        .records()
        .iter()
        .filter_map(|(i, r)| match r.entry() {
            Entry::Grant(g) => Some(GrantRow {
                principal: g.principal.clone(),
                action: g.action.to_string(),
                resource: g.resource.to_string(),
                status: status(r, access.counts(g)),
                signed_by: r.create.by.principal.clone(),
                entry: i.to_string(),
            }),
            Entry::Token(_) | Entry::Function(_) => None,
        })
        .collect();
    let header =
        format!("{:<20} {:<8} {:<30} {:<13} {:<16} ENTRY", "PRINCIPAL", "ACTION", "RESOURCE", "STATUS", "SIGNED BY");
    print_rows(&rows, json, &header, |r| {
        format!(
            "{:<20} {:<8} {:<30} {:<13} {:<16} {}",
            r.principal, r.action, r.resource, r.status, r.signed_by, r.entry
        )
    })
}

/// `rill tokens`.
#[derive(Debug, Subcommand)]
pub(crate) enum TokensCommand {
    /// Create a bearer token for a principal; prints it once (the node keeps only its
    /// salted hash). A superuser may create one for anyone, a principal for itself.
    Create {
        /// The principal the token authenticates.
        #[arg(long)]
        principal: String,
        /// Lifetime, like 90d, 12h or none.
        #[arg(long, default_value = "90d")]
        expires: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a token by its id (the part after `rill_`, before the next `_`).
    Revoke {
        /// The token's id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the tokens the principal may see (never their secrets).
    List(ListArgs),
}

#[derive(Debug, serde::Serialize)]
struct TokenRow {
    id: String,
    principal: String,
    expires_ms: Option<u64>,
    status: &'static str,
}

/// `rill tokens ...`.
pub(crate) async fn tokens(cmd: TokensCommand) -> anyhow::Result<()> {
    match cmd {
        TokensCommand::Create { principal, expires, conn } => {
            rill_transport::certs::check_principal(&principal)?;
            let lifetime_s = parse_amount(&expires, DURATION_UNITS, "--expires")?;
            let expires_ms = lifetime_s.map(|s| now_ms().saturating_add(s.saturating_mul(1000)));
            let (token, record) = crate::authz::new_token(&principal, expires_ms, &random()?);
            conn.run(async |client| create(client, Entry::Token(record)).await).await?;
            eprintln!("token for '{principal}' (shown once; keep it secret):");
            println!("{token}");
            Ok(())
        }
        TokensCommand::Revoke { id, conn } => {
            let what = format!("token '{id}'");
            let matches = |e: &Entry| matches!(e, Entry::Token(t) if t.id == id);
            conn.run(async |client| delete_matching(client, &what, matches).await).await?;
            println!("revoked token {id}");
            Ok(())
        }
        TokensCommand::List(ListArgs { conn, json }) => {
            let (doc, access) = conn.run(catalogue).await?;
            let rows: Vec<TokenRow> = doc
                .records()
                .iter()
                .filter_map(|(_, r)| match r.entry() {
                    Entry::Token(t) => Some(TokenRow {
                        id: t.id.clone(),
                        principal: t.principal.clone(),
                        expires_ms: t.expires_ms,
                        status: status(r, access.token(&t.id).is_some()),
                    }),
                    Entry::Grant(_) | Entry::Function(_) => None,
                })
                .collect();
            let header = format!("{:<18} {:<20} {:<16} STATUS", "ID", "PRINCIPAL", "EXPIRES (ms)");
            print_rows(&rows, json, &header, |r| {
                let expires = r.expires_ms.map_or("never".to_string(), |e| e.to_string());
                format!("{:<18} {:<20} {:<16} {}", r.id, r.principal, expires, r.status)
            })
        }
    }
}

/// Flags of `rill whoami`.
#[derive(Debug, Args)]
pub(crate) struct WhoAmIArgs {
    /// Ask whom this bearer token names instead.
    #[arg(long)]
    token: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// `rill whoami`.
pub(crate) async fn who_am_i(args: WhoAmIArgs) -> anyhow::Result<()> {
    let token = args.token.as_deref();
    let (name, superuser, grants) =
        args.conn.run(async |client| client.who_am_i(token).await.context("whoami")).await?;
    println!("{name}{}", if superuser { " (superuser)" } else { "" });
    for g in grants {
        println!("  {g}");
    }
    Ok(())
}
