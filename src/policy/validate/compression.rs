//! Validation of `[compression]`.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only these tables' rules.

use super::*;

impl Validator<'_> {
    pub(super) fn compression(
        &self,
        raw: Spanned<raw::RawCompression>,
    ) -> Result<CompressionPolicy, PolicyError> {
        use crate::coding::Coding;
        let span = raw.span();
        let raw = raw.into_inner();
        let algorithms: Vec<Coding> = raw
            .algorithms
            .unwrap_or_else(|| vec![raw::Encoding::Br, raw::Encoding::Gzip])
            .into_iter()
            .map(|e| match e {
                raw::Encoding::Br => Coding::Br,
                raw::Encoding::Gzip => Coding::Gzip,
            })
            .collect();
        if algorithms.is_empty() {
            return Err(self.err(
                span,
                "compression.algorithms",
                "no algorithms: nothing would be compressed",
                "list at least one of \"br\", \"gzip\", or remove [compression]",
            ));
        }
        if algorithms
            .iter()
            .enumerate()
            .any(|(i, a)| algorithms[..i].contains(a))
        {
            return Err(self.err(
                span,
                "compression.algorithms",
                "an algorithm is listed twice",
                "list each of \"br\", \"gzip\" once, in order of preference",
            ));
        }
        let gzip_level = raw.gzip_level.unwrap_or(6);
        if gzip_level > 9 {
            return Err(self.err(
                span,
                "compression.gzip_level",
                format!("gzip_level {gzip_level} is out of range"),
                "use 1 (fastest) to 9 (smallest); 6 is the usual balance",
            ));
        }
        let brotli_quality = raw.brotli_quality.unwrap_or(5);
        if brotli_quality > 11 {
            return Err(self.err(
                span,
                "compression.brotli_quality",
                format!("brotli_quality {brotli_quality} is out of range"),
                "use 0 (fastest) to 11 (smallest); 4 to 6 suit answers compressed as they stream",
            ));
        }
        let defaults = [
            "application/json",
            "application/x-ndjson",
            "text/event-stream",
            "text/*",
        ];
        let mut content_types = Vec::new();
        for t in raw
            .content_types
            .unwrap_or_else(|| defaults.iter().map(|t| (*t).to_owned()).collect())
        {
            let t = t.trim().to_ascii_lowercase();
            let valid = t.split_once('/').is_some_and(|(ty, sub)| {
                let token = |s: &str| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                };
                token(ty) && (sub == "*" || token(sub))
            });
            if !valid {
                return Err(self.err(
                    span,
                    "compression.content_types",
                    format!("`{t}` is not a media type"),
                    "write type/subtype or type/*, e.g. \"application/json\" or \"text/*\"",
                ));
            }
            content_types.push(t);
        }
        Ok(CompressionPolicy {
            algorithms,
            min_size: raw.min_size.map_or(1024, |s| s.0),
            content_types,
            gzip_level,
            brotli_quality,
        })
    }
}
