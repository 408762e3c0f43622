//! OpenPGP signing of `Release` files with rPGP (`pgp`), no gpg at run time.
//!
//! Owns: [`RepoKey`] — generation of a per-project key, its armored secret form (for
//! kiln to store), the armored public key (served as `key.asc`), the clear-signed
//! `InRelease` and the detached armored `Release.gpg`.
//!
//! What must stay true:
//! - Keys are v4 with an EdDSA-legacy (algorithm 22) Ed25519 primary that can certify
//!   and sign, self-signed with SHA-256. Debian 12's gpgv (GnuPG 2.2) does not know
//!   the RFC 9580 Ed25519 algorithm (27) nor v6 keys, so those must not be used until
//!   the oldest supported apt client understands them.
//! - Signatures use SHA-2 (`InRelease`: SHA-256, rPGP's choice for Ed25519;
//!   `Release.gpg`: SHA-512). apt refuses SHA-1.
//! - Randomness comes from the OS (`OsRng`); nothing is derived from inputs.

use pgp::composed::{
    ArmorOptions, CleartextSignedMessage, Deserializable, DetachedSignature, KeyType,
    SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::ser::Serialize;
use pgp::types::{KeyDetails, Password};
use rand_core::OsRng;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("invalid key parameters: {0}")]
    Params(String),
    #[error("OpenPGP: {0}")]
    Pgp(#[from] pgp::errors::Error),
    #[error("the key is not an unlocked secret key usable for signing: {0}")]
    Unusable(&'static str),
}

/// A repository signing key (secret part included).
#[derive(Clone)]
pub struct RepoKey {
    secret: SignedSecretKey,
}

/// Only the fingerprint: the secret must never reach logs through `{:?}`.
impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoKey")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl RepoKey {
    /// Generates a new key with the given User ID, e.g. `"kiln repository key for
    /// project foo <kiln@localhost>"`. Takes well under a millisecond.
    pub fn generate(user_id: &str) -> Result<RepoKey, SignError> {
        let params = SecretKeyParamsBuilder::default()
            .key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(true)
            .primary_user_id(user_id.into())
            .preferred_hash_algorithms(
                [HashAlgorithm::Sha512, HashAlgorithm::Sha256]
                    .into_iter()
                    .collect(),
            )
            .build()
            .map_err(|e| SignError::Params(e.to_string()))?;
        let secret = params.generate(OsRng)?;
        Ok(RepoKey { secret })
    }

    /// Loads a key saved with [`RepoKey::to_armored_secret`].
    pub fn from_armored_secret(armored: &str) -> Result<RepoKey, SignError> {
        let (secret, _headers) = SignedSecretKey::from_string(armored)?;
        secret.verify_bindings()?;
        if secret.primary_key.secret_params().is_encrypted() {
            return Err(SignError::Unusable("it is passphrase-protected"));
        }
        Ok(RepoKey { secret })
    }

    /// The secret key, ASCII-armored, unencrypted: store it like any other secret.
    pub fn to_armored_secret(&self) -> Result<String, SignError> {
        Ok(self.secret.to_armored_string(ArmorOptions::default())?)
    }

    /// The public key, ASCII-armored, for `/repos/<project>/key.asc` and apt's
    /// `signed-by=`.
    pub fn public_key_armored(&self) -> Result<String, SignError> {
        let public = SignedPublicKey::from(self.secret.clone());
        Ok(public.to_armored_string(ArmorOptions::default())?)
    }

    /// Upper-case hex fingerprint (40 digits for a v4 key).
    pub fn fingerprint(&self) -> String {
        hex::encode_upper(self.secret.fingerprint().as_bytes())
    }

    /// `InRelease`: the Release text, clear-signed.
    pub fn clearsign(&self, text: &str) -> Result<String, SignError> {
        let msg = CleartextSignedMessage::sign(
            OsRng,
            text,
            &self.secret.primary_key,
            &Password::empty(),
        )?;
        Ok(msg.to_armored_string(ArmorOptions::default())?)
    }

    /// `Release.gpg`: an armored detached binary signature over `data`.
    pub fn detached_sign(&self, data: &[u8]) -> Result<String, SignError> {
        let sig = DetachedSignature::sign_binary_data(
            OsRng,
            &self.secret.primary_key,
            &Password::empty(),
            HashAlgorithm::Sha512,
            data,
        )?;
        Ok(sig.to_armored_string(ArmorOptions::default())?)
    }

    /// A binary (unarmored) v4 signature packet over `data`, hashed with SHA-256: the
    /// form rpm keeps in an RPM's signature header (`RPMSIGTAG_DSA` for EdDSA keys).
    /// rpm 4.18 finds the key by the issuer subpacket rPGP always adds.
    pub fn detached_sign_binary(&self, data: &[u8]) -> Result<Vec<u8>, SignError> {
        let sig = DetachedSignature::sign_binary_data(
            OsRng,
            &self.secret.primary_key,
            &Password::empty(),
            HashAlgorithm::Sha256,
            data,
        )?;
        Ok(sig.to_bytes()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_is_fast_and_random() {
        let t = std::time::Instant::now();
        let a = RepoKey::generate("a <a@localhost>").unwrap();
        let b = RepoKey::generate("a <a@localhost>").unwrap();
        assert!(t.elapsed().as_millis() < 500, "{:?}", t.elapsed());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 40);
        let dbg = format!("{a:?}");
        assert!(dbg.contains(&a.fingerprint()) && dbg.len() < 100, "{dbg}");
    }

    #[test]
    fn secret_round_trip_and_signatures_verify() {
        let k = RepoKey::generate("kiln <k@localhost>").unwrap();
        let armored = k.to_armored_secret().unwrap();
        assert!(armored.starts_with("-----BEGIN PGP PRIVATE KEY BLOCK-----"));
        let k2 = RepoKey::from_armored_secret(&armored).unwrap();
        assert_eq!(k.fingerprint(), k2.fingerprint());

        let pubkey = k.public_key_armored().unwrap();
        assert!(pubkey.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"));
        assert!(!pubkey.contains("PRIVATE"));
        let (public, _) = SignedPublicKey::from_string(&pubkey).unwrap();

        let text = "Origin: x\n- dash line\nSHA256:\n abc 1 main/binary-amd64/Packages\n";
        let signed = k2.clearsign(text).unwrap();
        assert!(signed.starts_with("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA"));
        let (msg, _) = CleartextSignedMessage::from_string(&signed).unwrap();
        msg.verify(&public).unwrap();
        // The final newline is signed too; the armor adds the delimiter line after it,
        // so apt and gpgv recover exactly `text`.
        assert_eq!(msg.signed_text(), text.replace('\n', "\r\n"));
        assert!(
            signed.contains("\n- - dash line\n"),
            "dash-escaped: {signed}"
        );
        assert!(signed.contains("/Packages\n\n-----BEGIN PGP SIGNATURE-----\n"));

        let det = k2.detached_sign(text.as_bytes()).unwrap();
        let (sig, _) = DetachedSignature::from_string(&det).unwrap();
        sig.verify(&public, text.as_bytes()).unwrap();
        assert!(sig.verify(&public, b"other").is_err());

        let bin = k2.detached_sign_binary(text.as_bytes()).unwrap();
        // A binary packet (tag 2, signature), not armor.
        assert!(bin[0] & 0x80 != 0 && !bin.starts_with(b"-----"));
        let sig = DetachedSignature::from_bytes(&bin[..]).unwrap();
        assert_eq!(sig.signature.hash_alg(), Some(HashAlgorithm::Sha256));
        sig.verify(&public, text.as_bytes()).unwrap();
        assert!(sig.verify(&public, b"other").is_err());
    }

    #[test]
    fn garbage_keys_are_errors() {
        assert!(RepoKey::from_armored_secret("nope").is_err());
        let k = RepoKey::generate("kiln <k@localhost>").unwrap();
        // A public key is not a usable secret key.
        assert!(RepoKey::from_armored_secret(&k.public_key_armored().unwrap()).is_err());
    }
}
