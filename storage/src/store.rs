//! The set of topics on a node: discovery at start-up and creation on first use.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    error::{Result, StorageError},
    fs::FileSystem,
    log::LogConfig,
    meta::MetaStore,
    name::TopicName,
    topic::TopicStore,
};

/// Directory under the data dir that holds topic logs.
pub const TOPICS_DIR: &str = "topics";

/// Finds every topic directory (`tenant/namespace/topic`) under `root`.
pub fn discover_topics(fs: &dyn FileSystem, root: &Path) -> Result<Vec<TopicName>> {
    let list = |p: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> =
            fs.read_dir(p).map_err(|e| StorageError::io(p, e))?.into_iter().filter(|p| fs.is_dir(p)).collect();
        v.sort();
        Ok(v)
    };
    if !fs.is_dir(root) {
        return Ok(Vec::new());
    }
    let mut topics = Vec::new();
    for tenant in list(root)? {
        for ns in list(&tenant)? {
            for topic in list(&ns)? {
                let name = [&tenant, &ns, &topic]
                    .map(|p| p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string())
                    .join("/");
                match TopicName::parse(&name) {
                    Ok(t) => topics.push(t),
                    Err(e) => {
                        tracing::warn!(path = %topic.display(), error = %e, "ignoring directory that is not a topic")
                    }
                }
            }
        }
    }
    Ok(topics)
}

/// Opens every topic found under `root`. A topic that fails to open (a corrupt segment,
/// say) is returned with its error instead of failing the others.
pub fn open_all(
    fs: &Arc<dyn FileSystem>,
    meta: &dyn MetaStore,
    root: &Path,
    config: LogConfig,
) -> Result<BTreeMap<TopicName, Result<TopicStore>>> {
    let mut topics = BTreeMap::new();
    for name in discover_topics(fs.as_ref(), root)? {
        let opened = TopicStore::open(Arc::clone(fs), meta, root, name.clone(), config);
        topics.insert(name, opened);
    }
    Ok(topics)
}
