//! A stream function's definition, as the catalogue keeps it (issue 17): what runs (a
//! module, by the SHA-256 of its bytes, stored as a blob), over which topics, on which
//! nodes, with which parameters. It is a signed catalogue entry ([`crate::access`]):
//! created, edited (`update`, `pause`, `resume`) and deleted by an admin of every
//! namespace it touches.
use std::collections::BTreeSet;

use rill_storage::{NamespaceName, NodeName, TopicName, name::check_part};
use serde::{Deserialize, Serialize};

/// Where a new function starts reading its inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Start {
    /// The first message held.
    #[default]
    Earliest,
    /// After the last message held when the node starts the function.
    Latest,
}

/// A function's definition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FunctionDef {
    /// `tenant/namespace/name`.
    pub name: String,
    /// SHA-256 of the module's bytes.
    pub module: [u8; 32],
    /// Input topics (`tenant/namespace/topic`); outputs derive their ids from the index.
    pub inputs: Vec<String>,
    /// Output topics; a guest names them by index.
    pub outputs: Vec<String>,
    /// The nodes that run it; `None`: every node in the first input namespace's clusters.
    pub nodes: Option<BTreeSet<NodeName>>,
    /// Where a new function starts.
    pub start: Start,
    /// Parameters for the module's `rill_init`.
    pub params: Vec<(String, String)>,
    /// True while paused: no node runs it; its cursors stay.
    pub paused: bool,
}

/// The longest topic name part: a function's progress topic `fn.NAME.progress` (and its
/// dead-letter topic `fn.NAME.dlq`) must fit.
const PART_MAX: usize = 64;

impl FunctionDef {
    /// The namespace the function lives in.
    pub fn namespace(&self) -> Option<NamespaceName> {
        let (ns, _) = self.name.rsplit_once('/')?;
        NamespaceName::parse(ns).ok()
    }

    /// The function's own name (the last part of `tenant/namespace/name`).
    pub fn short_name(&self) -> &str {
        self.name.rsplit_once('/').map_or(&self.name, |(_, n)| n)
    }

    /// The dead-letter topic: `fn.NAME.dlq` in the function's namespace.
    pub fn dead_letter_topic(&self) -> String {
        let ns = self.name.rsplit_once('/').map_or("", |(ns, _)| ns);
        format!("{ns}/fn.{}.dlq", self.short_name())
    }

    /// The progress topic: `fn.NAME.progress` in the function's namespace, where each node
    /// records the inputs it processed (DESIGN section 8).
    pub fn progress_topic(&self) -> String {
        let ns = self.name.rsplit_once('/').map_or("", |(ns, _)| ns);
        format!("{ns}/fn.{}.progress", self.short_name())
    }

    /// Every namespace the function reads, writes or lives in: an admin of all of them
    /// may create, change or delete it.
    pub fn namespaces(&self) -> BTreeSet<NamespaceName> {
        let topics = self.inputs.iter().chain(&self.outputs);
        let mut all: BTreeSet<NamespaceName> =
            topics.filter_map(|t| TopicName::parse(t).ok()).map(|t| t.namespace_name()).collect();
        all.extend(self.namespace());
        all
    }

    /// Checks the names and the shape; the error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let parts: Vec<&str> = self.name.split('/').collect();
        let [tenant, ns, name] = parts[..] else {
            return Err(format!("function '{}': the form is tenant/namespace/name", self.name));
        };
        for part in [tenant, ns, name] {
            check_part("function", part).map_err(|e| format!("function '{}': {e}", self.name))?;
        }
        let progress = format!("fn.{name}.progress");
        if progress.len() > PART_MAX {
            return Err(format!(
                "function name '{name}' is too long: its progress topic '{progress}' must fit in {PART_MAX} characters \
                 (at most {} for the name)",
                PART_MAX - 12
            ));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err("a function needs at least one input and one output topic".into());
        }
        for t in self.inputs.iter().chain(&self.outputs) {
            TopicName::parse(t).map_err(|e| e.to_string())?;
        }
        if let Some(t) = self.inputs.iter().find(|t| self.outputs.contains(t)) {
            return Err(format!("topic '{t}' is both an input and an output: the function would feed itself"));
        }
        if self.nodes.as_ref().is_some_and(BTreeSet::is_empty) {
            return Err("--nodes names no node".into());
        }
        let dup = self.params.iter().enumerate().find(|(i, (k, _))| self.params[..*i].iter().any(|(k2, _)| k2 == k));
        if let Some((_, (k, _))) = dup {
            return Err(format!("parameter '{k}' is given twice"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn def(name: &str, inputs: &[&str], outputs: &[&str]) -> FunctionDef {
        FunctionDef {
            name: name.into(),
            module: [7; 32],
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            nodes: None,
            start: Start::Earliest,
            params: Vec::new(),
            paused: false,
        }
    }

    #[test]
    fn a_definition_names_its_namespaces_and_dead_letter_topic() {
        let d = def("acme/fx/norm", &["acme/raw/t"], &["acme/clean/t", "globex/x/t"]);
        assert_eq!(d.check(), Ok(()));
        assert_eq!(d.dead_letter_topic(), "acme/fx/fn.norm.dlq");
        assert_eq!(d.progress_topic(), "acme/fx/fn.norm.progress");
        let ns: Vec<String> = d.namespaces().iter().map(|n| n.to_string()).collect();
        assert_eq!(ns, ["acme/clean", "acme/fx", "acme/raw", "globex/x"]);
    }

    #[test]
    fn bad_definitions_are_refused_by_name() {
        let cases = [
            (def("acme/norm", &["a/b/c"], &["a/b/d"]), "tenant/namespace/name"),
            (def("acme/fx/no pe", &["a/b/c"], &["a/b/d"]), "no pe"),
            (def(&format!("acme/fx/{}", "n".repeat(53)), &["a/b/c"], &["a/b/d"]), "too long"),
            (def("acme/fx/n", &[], &["a/b/d"]), "at least one input"),
            (def("acme/fx/n", &["a/b"], &["a/b/d"]), "a/b"),
            (def("acme/fx/n", &["a/b/c"], &["a/b/c"]), "feed itself"),
        ];
        for (d, want) in cases {
            let err = d.check().unwrap_err();
            assert!(err.contains(want), "{err} should name {want}");
        }
        let mut d = def("acme/fx/n", &["a/b/c"], &["a/b/d"]);
        assert!(
            d.check().is_ok() && def(&format!("acme/fx/{}", "n".repeat(52)), &["a/b/c"], &["a/b/d"]).check().is_ok()
        );
        d.params = vec![("k".into(), "1".into()), ("k".into(), "2".into())];
        assert!(d.check().unwrap_err().contains("'k' is given twice"));
        d.params.clear();
        d.nodes = Some(BTreeSet::new());
        assert!(d.check().is_err());
    }
}
