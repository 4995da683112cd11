//! Validation of `[auth]`: where the keys Hyperion issued are kept.
//!
//! Part of `validate.rs`'s `Validator` (its errors, its order): this file
//! owns only this table's rules. The keys file's format is `auth.rs`'s.

use super::*;

impl Validator<'_> {
    pub(super) fn auth(&self, raw: &Spanned<raw::RawAuth>) -> Result<AuthPolicy, PolicyError> {
        let Some(file) = &raw.get_ref().keys_file else {
            return Err(self.err(
                raw.span(),
                "auth.keys_file",
                "no keys_file: there would be no key to accept",
                "add keys_file = \"keys.toml\" (relative to this file), then `hyperion keys add NAME`",
            ));
        };
        let keys_file = self.src.relative_path(file.get_ref());
        // A file not made yet is an empty keyring: every request on a route
        // that requires a key is refused until `hyperion keys add`.
        let keyring = crate::auth::Keyring::load(&keys_file).map_err(|e| {
            self.err(
                file.span(),
                "auth.keys_file",
                format!("{} cannot be read: {e}", keys_file.display()),
                "fix the file, or make it again with `hyperion keys add NAME`",
            )
        })?;
        Ok(AuthPolicy {
            keys_file,
            keyring: Arc::new(arc_swap::ArcSwap::from_pointee(keyring)),
        })
    }
}
