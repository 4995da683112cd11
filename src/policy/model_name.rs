//! A model name as the policy writes it (`models = [...]`) and as upstreams
//! and request bodies name it: compared the way Ollama resolves names.
//!
//! A policy type, so `policy` names models without importing the upstream
//! code that routes by them (`upstream::models`).

use std::sync::Arc;

/// A model name as Ollama resolves it: lower case, tagged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName(Arc<str>);

impl ModelName {
    /// `None` for what cannot be a model name (empty, blank, control
    /// characters, over 512 bytes).
    pub fn parse(raw: &str) -> Option<ModelName> {
        let name = raw.trim();
        if name.is_empty()
            || name.len() > 512
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return None;
        }
        let mut out = name.to_lowercase();
        // The tag follows the last `:` of the last path segment: a
        // registry's port (`host:5000/model`) is not a tag.
        let last_segment = out.rsplit('/').next().unwrap_or("");
        if !last_segment.contains(':') {
            out.push_str(":latest");
        }
        Some(ModelName(out.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
