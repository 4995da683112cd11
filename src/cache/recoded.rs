//! A stored entry's body in other codings: compressed copies (gzip, br)
//! of an identity body, or the decoded copy of a body the upstream sent
//! encoded.
//!
//! Each copy is made at most once per entry, by the first request that
//! needs it (the others needing it meanwhile wait for that one), and kept
//! with the entry, counted in the store's weight. Which copy a response
//! needs is decided in `compress`; this module only keeps them.

use std::sync::{Arc, OnceLock};

use http::HeaderValue;
use moka::ops::compute::Op;
use tokio::sync::OnceCell;

use super::{Cache, Entry, Stored, StoredBody};
use crate::compress::{self, Coding, Decoding, Treatment, Unkept};

/// Which other coding of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The identity body compressed.
    Encoded(Coding),
    /// The upstream's encoded body decoded.
    Decoded(Decoding),
}

/// A copy made, or why there is none (decided once, like the copy).
pub type Copy = Result<Arc<Recoded>, Unkept>;

/// One copy of a stored body in another coding.
#[derive(Debug)]
pub struct Recoded {
    pub body: StoredBody,
    /// Its exact `Content-Length`; none for a recorded stream, which is
    /// replayed chunked like its identity body.
    pub length: Option<HeaderValue>,
    /// The entry's strong `ETag` and its weak form, sent with the copy.
    pub etag: Option<(HeaderValue, HeaderValue)>,
}

/// The copies an entry has, and how its coding is treated.
#[derive(Debug, Default)]
pub struct Recodings {
    /// Decided once, on the entry's first response.
    treatment: OnceLock<Treatment>,
    br: OnceCell<Copy>,
    gzip: OnceCell<Copy>,
    decoded: OnceCell<Copy>,
}

/// Bodies up to this size are recoded on the request's own thread; larger
/// ones on the blocking pool, so a worker is never held for long.
const INLINE_LIMIT: usize = 64 * 1024;

impl Recodings {
    pub fn treatment(&self, decide: impl FnOnce() -> Treatment) -> Treatment {
        *self.treatment.get_or_init(decide)
    }

    /// The copies, for an entry with the same body (a 304 refreshed its
    /// headers): the treatment is decided again.
    pub fn carried(&self) -> Recodings {
        let keep = |c: &OnceCell<Copy>| OnceCell::new_with(c.get().cloned());
        Recodings {
            treatment: OnceLock::new(),
            br: keep(&self.br),
            gzip: keep(&self.gzip),
            decoded: keep(&self.decoded),
        }
    }

    fn cell(&self, form: Form) -> &OnceCell<Copy> {
        match form {
            Form::Encoded(Coding::Br) => &self.br,
            Form::Encoded(Coding::Gzip) => &self.gzip,
            Form::Decoded(_) => &self.decoded,
        }
    }

    /// Bytes the copies take.
    pub fn weight(&self) -> usize {
        [&self.br, &self.gzip, &self.decoded]
            .into_iter()
            .filter_map(|c| c.get().and_then(|c| c.as_ref().ok()))
            .map(|c| c.body.len() + 64)
            .sum()
    }
}

impl Cache {
    /// `entry`'s body as `form` (`level` for compression): the kept copy,
    /// or one made now and kept; or why there is none.
    pub async fn recoded(&self, entry: &Arc<Entry>, form: Form, level: u32) -> Copy {
        let cell = entry.recodings.cell(form);
        if let Some(copy) = cell.get() {
            return copy.clone();
        }
        let limit = self.policy.max_entry_size;
        let mut made = false;
        let copy = cell
            .get_or_init(|| async {
                made = true;
                let body = entry.body.clone();
                let recoded = if body.len() <= INLINE_LIMIT {
                    compress::recode(form, level, &body, limit)
                } else {
                    tokio::task::spawn_blocking(move || compress::recode(form, level, &body, limit))
                        .await
                        .unwrap_or(Err(Unkept::Corrupt))
                };
                recoded.map(|body| {
                    let length = match body {
                        StoredBody::Whole(ref b) => Some(HeaderValue::from(b.len())),
                        StoredBody::Chunks(_) => None,
                    };
                    let etag = entry.headers.get(http::header::ETAG).and_then(|strong| {
                        compress::weakened(strong).map(|weak| (strong.clone(), weak))
                    });
                    Arc::new(Recoded { body, length, etag })
                })
            })
            .await
            .clone();
        if made && copy.is_ok() {
            self.reweigh(entry).await;
        }
        copy
    }

    /// Puts `entry` back under its key so the store weighs its new copies;
    /// unless it is no longer the one stored there.
    async fn reweigh(&self, entry: &Arc<Entry>) {
        let put = Op::Put(Stored::Entry(entry.clone()));
        self.if_still_stored(entry, put).await;
    }

    /// Drops `entry` from the store, if it is still the one stored.
    pub async fn remove(&self, entry: &Arc<Entry>) {
        self.if_still_stored(entry, Op::Remove).await;
    }

    /// Applies `op` to `entry`'s key if `entry` is what the key holds: not
    /// a newer answer stored since, nor one dropped by an invalidation.
    async fn if_still_stored(&self, entry: &Arc<Entry>, op: Op<Stored>) {
        self.store
            .entry(entry.store_key())
            .and_compute_with(|now| {
                let same = matches!(
                    now.as_ref().map(|e| e.value()),
                    Some(Stored::Entry(e)) if Arc::ptr_eq(e, entry)
                );
                std::future::ready(if same { op } else { Op::Nop })
            })
            .await;
    }
}
