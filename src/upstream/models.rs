//! Which servers of a pool serve which model (`model_routing`), and the
//! polling that learns it.
//!
//! - `static`: a server serves the models of its `models` list; a server
//!   without one serves any model.
//! - `discover`: each server is asked every `discover_interval` what it
//!   serves (`GET /api/tags`, or `GET /v1/models` for OpenAI-compatible
//!   servers, which answer 404 to the first) and what it has loaded
//!   (`GET /api/ps`). Until a server first answers, its `models` list (or
//!   any model) stands in; when it stops answering, its last answer stands.
//!
//! Names compare the way Ollama resolves them: case-insensitively, with
//! `:latest` for a name without a tag (`llama3.2` is `llama3.2:latest`).
//!
//! The request path reads one immutable table (`ModelTable`, swapped
//! whole when something changes): a hash lookup gives the servers serving
//! the model and those that have it loaded, as bit sets over the pool. This
//! module does not choose among them (`balance`) nor read request bodies
//! beyond their `model` field.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;

use super::conns::ServerConns;
pub use crate::policy::ModelName;
use crate::policy::{ModelRouting, UpstreamPolicy, UpstreamServer};

/// The longest model list (`/api/tags`, `/v1/models`) read from a server.
const MAX_LIST_BYTES: usize = 4 << 20;

/// The `model` a request body asks for (Ollama's and OpenAI's APIs both
/// name it at the top of a JSON object); `None` when the body is not a JSON
/// object or names no usable model.
pub fn requested_model(body: &[u8]) -> Option<ModelName> {
    #[derive(Deserialize)]
    struct Fields<'a> {
        #[serde(borrow, default)]
        model: Option<Cow<'a, str>>,
    }
    // serde reads a struct from an array too: only objects name a model.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let fields: Fields<'_> = serde_json::from_slice(body).ok()?;
    ModelName::parse(&fields.model?)
}

/// Where a request for a model may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelChoice {
    /// Any server: no model routing, or no model named.
    Any,
    /// Servers serving the model (a bit per server), and those of them
    /// known to have it loaded.
    Among { serving: u64, loaded: u64 },
    /// No server serves it; the models the pool does serve, sorted.
    Unknown { served: Vec<String> },
}

/// One pool's model knowledge, shared by every worker.
pub struct PoolModels {
    mode: ModelRouting,
    /// Parallel to the pool's servers.
    servers: Box<[Mutex<ServerModels>]>,
    table: ArcSwap<ModelTable>,
    /// Held while a new table is built and stored, so an older build never
    /// lands after a newer one.
    rebuild: Mutex<()>,
}

/// What is known of one server's models.
#[derive(Clone, Default)]
struct ServerModels {
    url: Arc<str>,
    /// Its `models` list in the policy; `None`: any model.
    listed: Option<Vec<ModelName>>,
    /// Its last answer to discovery.
    discovered: Option<Discovered>,
    /// Why the last discovery failed, when it did.
    error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Discovered {
    served: Vec<ModelName>,
    loaded: Vec<ModelName>,
}

/// The request path's view: rebuilt whole on every change.
#[derive(Default)]
struct ModelTable {
    /// Model → (servers serving it, servers having it loaded).
    by_name: HashMap<ModelName, (u64, u64)>,
    /// Servers that take any model.
    anything: u64,
}

/// One server's models as operators see them (the admin API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerModelsSnapshot {
    /// `None`: any model.
    pub models: Option<Vec<String>>,
    pub loaded: Vec<String>,
    /// Why discovery last failed, when it did.
    pub discovery_error: Option<String>,
}

impl ServerModels {
    fn served(&self, mode: ModelRouting) -> Option<&[ModelName]> {
        match (mode, &self.discovered) {
            (ModelRouting::Discover, Some(d)) => Some(&d.served),
            _ => self.listed.as_deref(),
        }
    }
}

impl PoolModels {
    /// The pool's table from its policy; servers of `before` with the same
    /// URL keep what discovery learnt.
    pub fn new(policy: &UpstreamPolicy, before: Option<&PoolModels>) -> Self {
        let servers: Box<[Mutex<ServerModels>]> = policy
            .servers
            .iter()
            .map(|s| {
                let discovered = before
                    .filter(|_| policy.model_routing == ModelRouting::Discover)
                    .and_then(|b| {
                        b.servers.iter().find_map(|old| {
                            let old = old.lock().expect("server models lock");
                            (old.url == s.url).then(|| old.discovered.clone()).flatten()
                        })
                    });
                Mutex::new(ServerModels {
                    url: s.url.clone(),
                    listed: s.models.clone(),
                    discovered,
                    error: None,
                })
            })
            .collect();
        let models = PoolModels {
            mode: policy.model_routing,
            servers,
            table: ArcSwap::from_pointee(ModelTable::default()),
            rebuild: Mutex::new(()),
        };
        models.rebuild();
        models
    }

    pub fn routes_by_model(&self) -> bool {
        self.mode != ModelRouting::Off
    }

    /// Where a request naming `model` may go.
    pub fn choose(&self, model: Option<&ModelName>) -> ModelChoice {
        let Some(model) = model.filter(|_| self.routes_by_model()) else {
            return ModelChoice::Any;
        };
        let table = self.table.load();
        let (serving, loaded) = table.by_name.get(model).copied().unwrap_or((0, 0));
        if serving | table.anything == 0 {
            let served: BTreeSet<&str> = table.by_name.keys().map(ModelName::as_str).collect();
            return ModelChoice::Unknown {
                served: served.into_iter().map(str::to_owned).collect(),
            };
        }
        ModelChoice::Among {
            serving: serving | table.anything,
            loaded,
        }
    }

    /// Server `index` answered a request for `model`: Ollama has loaded it
    /// there now, whatever the last `/api/ps` said.
    pub fn note_loaded(&self, index: usize, model: &ModelName) {
        if self.mode != ModelRouting::Discover {
            return;
        }
        let table = self.table.load();
        match table.by_name.get(model) {
            Some(&(serving, loaded)) if serving & (1 << index) != 0 => {
                if loaded & (1 << index) != 0 {
                    return;
                }
            }
            // Not one of its listed models (an `anything` server): nothing
            // to prefer it for until it lists it.
            _ => return,
        }
        {
            let mut server = self.servers[index].lock().expect("server models lock");
            let Some(d) = &mut server.discovered else {
                return;
            };
            if d.loaded.contains(model) {
                return;
            }
            d.loaded.push(model.clone());
        }
        self.rebuild();
    }

    fn discovered(&self, index: usize, outcome: Result<Discovered, String>) {
        {
            let mut server = self.servers[index].lock().expect("server models lock");
            match outcome {
                Ok(d) => {
                    if server.error.take().is_some() {
                        tracing::info!(server = &*server.url, "model discovery answers again");
                    }
                    if server.discovered.as_ref() == Some(&d) {
                        return;
                    }
                    server.discovered = Some(d);
                }
                Err(why) => {
                    if server.error.is_none() {
                        tracing::warn!(
                            server = &*server.url,
                            "model discovery failed, keeping what it last said: {why}"
                        );
                    }
                    server.error = Some(why);
                    return;
                }
            }
        }
        self.rebuild();
    }

    fn rebuild(&self) {
        let _one_at_a_time = self.rebuild.lock().expect("model table rebuild lock");
        let mut table = ModelTable::default();
        for (i, server) in self.servers.iter().enumerate() {
            let bit = 1u64 << i;
            let server = server.lock().expect("server models lock");
            match server.served(self.mode) {
                None => table.anything |= bit,
                Some(served) => {
                    for m in served {
                        table.by_name.entry(m.clone()).or_default().0 |= bit;
                    }
                }
            }
            if let (ModelRouting::Discover, Some(d)) = (self.mode, &server.discovered) {
                for m in &d.loaded {
                    if let Some(entry) = table.by_name.get_mut(m) {
                        entry.1 |= bit;
                    }
                }
            }
        }
        self.table.store(Arc::new(table));
    }

    /// Server `index`'s models, for operators.
    pub fn snapshot(&self, index: usize) -> ServerModelsSnapshot {
        let server = self.servers[index].lock().expect("server models lock");
        let names = |v: &[ModelName]| v.iter().map(|m| m.as_str().to_owned()).collect();
        ServerModelsSnapshot {
            models: server.served(self.mode).map(names),
            loaded: match (self.mode, &server.discovered) {
                (ModelRouting::Discover, Some(d)) => names(&d.loaded),
                _ => Vec::new(),
            },
            discovery_error: server.error.clone(),
        }
    }
}

/// The discovery of one server's models, every `discover_interval`.
pub struct Discovery {
    pub server: UpstreamServer,
    pub index: usize,
    pub models: Weak<PoolModels>,
    pub interval: Duration,
    pub connect_timeout: Duration,
}

impl Discovery {
    pub async fn run(self) {
        let conns = ServerConns::new(&self.server, self.connect_timeout);
        let timeout = self.interval.min(Duration::from_secs(5));
        // Soon after start (the table is guesswork until then), spread a
        // little so servers are not all asked at once.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
        loop {
            let outcome = tokio::time::timeout(timeout, self.poll(&conns))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no answer within {}",
                        humantime::format_duration(timeout)
                    ))
                });
            let Some(models) = self.models.upgrade() else {
                return;
            };
            models.discovered(self.index, outcome);
            drop(models);
            tokio::time::sleep(self.interval).await;
        }
    }

    async fn poll(&self, conns: &Arc<ServerConns>) -> Result<Discovered, String> {
        let get = |path| {
            conns.get(
                &self.server,
                path,
                "hyperion-model-discovery",
                MAX_LIST_BYTES,
            )
        };
        let (status, body) = get("/api/tags").await?;
        if status == StatusCode::NOT_FOUND {
            // Not Ollama: an OpenAI-compatible server lists its models at
            // /v1/models, and says nothing of what is loaded.
            let (status, body) = get("/v1/models").await?;
            if !status.is_success() {
                return Err(format!(
                    "GET /api/tags answered 404 and GET /v1/models answered {}",
                    status.as_u16()
                ));
            }
            return Ok(Discovered {
                served: openai_models(&body)
                    .ok_or("GET /v1/models answered something other than a model list")?,
                loaded: Vec::new(),
            });
        }
        if !status.is_success() {
            return Err(format!("GET /api/tags answered {}", status.as_u16()));
        }
        let served = ollama_models(&body)
            .ok_or("GET /api/tags answered something other than a model list")?;
        // What is loaded only steers the choice: without it, no preference.
        let loaded = match get("/api/ps").await {
            Ok((s, body)) if s.is_success() => ollama_models(&body).unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(Discovered { served, loaded })
    }
}

/// `{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest",…}]}`,
/// the shape of both `/api/tags` and `/api/ps`.
fn ollama_models(body: &Bytes) -> Option<Vec<ModelName>> {
    #[derive(Deserialize)]
    struct List {
        models: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        name: Option<String>,
        model: Option<String>,
    }
    let list: List = serde_json::from_slice(body).ok()?;
    Some(sorted(list.models.into_iter().filter_map(|e| {
        ModelName::parse(e.name.as_deref().or(e.model.as_deref())?)
    })))
}

/// `{"object":"list","data":[{"id":"…"}]}`.
fn openai_models(body: &Bytes) -> Option<Vec<ModelName>> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        id: String,
    }
    let list: List = serde_json::from_slice(body).ok()?;
    Some(sorted(
        list.data
            .into_iter()
            .filter_map(|e| ModelName::parse(&e.id)),
    ))
}

fn sorted(names: impl Iterator<Item = ModelName>) -> Vec<ModelName> {
    let mut v: Vec<ModelName> = names.collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ModelName {
        ModelName::parse(s).unwrap()
    }

    #[test]
    fn names_resolve_as_ollama_does() {
        assert_eq!(name("llama3.2"), name("llama3.2:latest"));
        assert_eq!(name(" Llama3.2:LATEST "), name("llama3.2"));
        assert_ne!(name("llama3.2:1b"), name("llama3.2"));
        assert_eq!(name("host:5000/team/m").as_str(), "host:5000/team/m:latest");
        assert_eq!(name("hf.co/a/b:Q4_K_M").as_str(), "hf.co/a/b:q4_k_m");
        assert!(ModelName::parse("").is_none());
        assert!(ModelName::parse("two words").is_none());
    }

    #[test]
    fn the_requested_model_is_the_top_level_field() {
        let m = |b: &str| requested_model(b.as_bytes());
        assert_eq!(m(r#"{"model":"phi3","prompt":"hi"}"#), Some(name("phi3")));
        assert_eq!(
            m(r#"{"messages":[{"model":"x"}],"model":"Phi3:Mini"}"#),
            Some(name("phi3:mini"))
        );
        assert_eq!(m(r#"{"prompt":"hi"}"#), None);
        assert_eq!(m(r#"{"model":""}"#), None);
        assert_eq!(m(r#"{"model":3}"#), None);
        assert_eq!(m("not json"), None);
        assert_eq!(m(r#"["model"]"#), None);
    }

    #[test]
    fn model_lists_parse_from_ollama_and_openai_shapes() {
        let tags = Bytes::from_static(
            br#"{"models":[{"name":"phi3:latest","model":"phi3:latest","size":1},{"model":"Llama3.2"}]}"#,
        );
        assert_eq!(
            ollama_models(&tags).unwrap(),
            vec![name("llama3.2"), name("phi3")]
        );
        let openai = Bytes::from_static(br#"{"object":"list","data":[{"id":"qwen2.5-7b"}]}"#);
        assert_eq!(openai_models(&openai).unwrap(), vec![name("qwen2.5-7b")]);
        assert!(ollama_models(&Bytes::from_static(b"<html>")).is_none());
    }
}
