//! Validated names: topics (`tenant/namespace/topic`), namespaces (`tenant/namespace`)
//! and nodes.
//!
//! Each part is 1..=64 characters of `[A-Za-z0-9._-]` and is neither `.` nor `..`, so that
//! a part is always a safe single directory name.
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest allowed name part, in characters.
pub const NAME_PART_CHARS_MAX: usize = 64;

/// Why a name was rejected; the message quotes the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name does not have the expected number of `/`-separated parts.
    #[error("{kind} name '{name}' must have the form {form}")]
    Shape {
        /// topic, namespace or node.
        kind: &'static str,
        /// The whole name as given.
        name: String,
        /// The expected form.
        form: &'static str,
    },
    /// One part is empty, too long, or has a character outside `[A-Za-z0-9._-]`.
    #[error("{kind} name part '{part}' is invalid: {why}")]
    Part {
        /// topic, namespace or node.
        kind: &'static str,
        /// The offending part.
        part: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Checks one name part (also used for subscription names).
pub fn check_part(kind: &'static str, part: &str) -> Result<(), NameError> {
    let bad = |why: String| Err(NameError::Part { kind, part: part.to_string(), why });
    if part.is_empty() {
        return bad("it is empty".into());
    }
    let chars = part.chars().count();
    if chars > NAME_PART_CHARS_MAX {
        return bad(format!("it has {chars} characters, the maximum is {NAME_PART_CHARS_MAX}"));
    }
    if part == "." || part == ".." {
        return bad("'.' and '..' are reserved".into());
    }
    if let Some(c) = part.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return bad(format!("character {c:?} is not one of A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

/// A topic's full name, `tenant/namespace/topic`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicName {
    tenant: String,
    namespace: String,
    topic: String,
}

impl TopicName {
    /// Parses and validates `tenant/namespace/topic`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let parts: Vec<&str> = name.split('/').collect();
        let [tenant, namespace, topic] = parts[..] else {
            return Err(NameError::Shape { kind: "topic", name: name.to_string(), form: "tenant/namespace/topic" });
        };
        for part in [tenant, namespace, topic] {
            check_part("topic", part)?;
        }
        Ok(TopicName { tenant: tenant.into(), namespace: namespace.into(), topic: topic.into() })
    }

    /// The tenant part.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The namespace part (without the tenant).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The topic part.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The namespace the topic belongs to (`tenant/namespace`).
    pub fn namespace_name(&self) -> NamespaceName {
        NamespaceName(format!("{}/{}", self.tenant, self.namespace).into())
    }

    /// The relative directory that holds this topic's segments.
    pub fn dir(&self) -> std::path::PathBuf {
        [&self.tenant, &self.namespace, &self.topic].iter().collect()
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.tenant, self.namespace, self.topic)
    }
}

/// A namespace's full name, `tenant/namespace`: the unit of replication policy. Cheap to
/// clone (one shared string).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamespaceName(std::sync::Arc<str>);

impl NamespaceName {
    /// Parses and validates `tenant/namespace`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let parts: Vec<&str> = name.split('/').collect();
        let [tenant, namespace] = parts[..] else {
            return Err(NameError::Shape { kind: "namespace", name: name.to_string(), form: "tenant/namespace" });
        };
        check_part("namespace", tenant)?;
        check_part("namespace", namespace)?;
        Ok(NamespaceName(name.into()))
    }

    /// The name as a string, `tenant/namespace`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tenant part.
    pub fn tenant(&self) -> &str {
        self.0.split_once('/').map_or(&*self.0, |(tenant, _)| tenant)
    }

    /// The namespace part (after the tenant).
    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, ns)| ns)
    }

    /// Whether `topic` belongs to this namespace.
    pub fn contains(&self, topic: &TopicName) -> bool {
        self.0.split_once('/') == Some((topic.tenant(), topic.namespace()))
    }
}

impl fmt::Display for NamespaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for NamespaceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A node's name, as it appears in its certificate and in namespace cluster lists. Cheap to
/// clone (one shared string), so maps and messages keyed by peer carry it rather than a copy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeName(std::sync::Arc<str>);

impl NodeName {
    /// Validates a node name (one part).
    pub fn parse(name: &str) -> Result<Self, NameError> {
        check_part("node", name)?;
        Ok(NodeName(name.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_topic_names() {
        let t = TopicName::parse("acme/sensors.eu/temp_1-a").unwrap();
        assert_eq!(t.to_string(), "acme/sensors.eu/temp_1-a");
        assert_eq!(t.tenant(), "acme");
        assert_eq!(t.namespace(), "sensors.eu");
        assert_eq!(t.topic(), "temp_1-a");
        assert!(TopicName::parse(&format!("a/b/{}", "x".repeat(64))).is_ok());
    }

    #[test]
    fn rejects_bad_topic_names_quoting_the_part() {
        let cases = [
            ("acme/sensors", "must have the form"),
            ("acme/sensors/temp/x", "must have the form"),
            ("acme//temp", "part '' is invalid"),
            ("acme/sen sors/temp", "part 'sen sors' is invalid: character ' '"),
            ("acme/../temp", "part '..' is invalid"),
            ("acme/ns/tëmp", "part 'tëmp'"),
        ];
        for (name, want) in cases {
            let err = TopicName::parse(name).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
        let long = format!("a/b/{}", "x".repeat(65));
        assert!(TopicName::parse(&long).unwrap_err().to_string().contains("65 characters"));
    }

    #[test]
    fn node_names() {
        assert!(NodeName::parse("edge-gw-17").is_ok());
        assert!(NodeName::parse("a/b").is_err());
        assert!(NodeName::parse("").is_err());
    }

    /// Catalogues, Hellos and clients' edits carried these names as strings before they
    /// had types: the encoding must stay a string's.
    #[test]
    fn typed_names_encode_as_their_strings() {
        let as_str = |s: &str| postcard::to_stdvec(s).unwrap();
        assert_eq!(postcard::to_stdvec(&NodeName::parse("eu-1").unwrap()).unwrap(), as_str("eu-1"));
        assert_eq!(postcard::to_stdvec(&NamespaceName::parse("t/n").unwrap()).unwrap(), as_str("t/n"));
        let back: NodeName = postcard::from_bytes(&as_str("eu-1")).unwrap();
        assert_eq!(back.as_str(), "eu-1");
    }

    #[test]
    fn namespace_names() {
        let ns = NamespaceName::parse("acme/sensors").unwrap();
        assert_eq!(ns, TopicName::parse("acme/sensors/temp").unwrap().namespace_name());
        assert!(ns.contains(&TopicName::parse("acme/sensors/x").unwrap()));
        assert!(!ns.contains(&TopicName::parse("acme/sensorsx/x").unwrap()));
        assert!(NamespaceName::parse("acme").unwrap_err().to_string().contains("tenant/namespace"));
        assert!(NamespaceName::parse("acme/a b").unwrap_err().to_string().contains("'a b'"));
    }
}
