//! CRAM-MD5 (RFC 2195): the client proves it knows the password by an
//! HMAC-MD5 of a one-time challenge keyed with it. The server must know the
//! password itself, so only users configured with `password` or
//! `password_file` can use it; an argon2 `password_hash` cannot answer.
//! MD5 is weak, which is why it is off unless `server.auth_mechanisms`
//! lists it: old devices (Ricoh and others) try it first.

use hmac::{Hmac, Mac};
use md5::Md5;
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// A fresh challenge, `<random.timestamp@hostname>` as RFC 2195 shows it:
/// unique per exchange, so a recorded answer cannot be replayed.
pub fn challenge(hostname: &str, unix_seconds: u64) -> String {
    let random: u64 = rand::thread_rng().r#gen();
    format!("<{random}.{unix_seconds}@{hostname}>")
}

/// Whether `digest` (the hex the client sent) is the HMAC-MD5 of
/// `challenge` keyed with `password`, compared in constant time.
pub fn verify(password: &Secret, challenge: &str, digest: &str) -> bool {
    let expected = digest_of(password, challenge);
    // Hex digits in either case are the same digest.
    let presented = digest.to_ascii_lowercase();
    bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// The digest a client that knows `password` answers `challenge` with:
/// HMAC-MD5 in lower-case hex.
pub fn digest_of(password: &Secret, challenge: &str) -> String {
    let mut mac = Hmac::<Md5>::new_from_slice(password.expose().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(challenge.as_bytes());
    let bytes = mac.finalize().into_bytes();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 2195, section 2: user "tim", password "tanstaaftanstaaf".
    const CHALLENGE: &str = "<1896.697170952@postoffice.reston.mci.net>";
    const DIGEST: &str = "b913a602c7eda7a495b4e6e7334d3890";

    #[test]
    fn the_rfc_2195_example_verifies() {
        let password = Secret::new("tanstaaftanstaaf");
        assert_eq!(digest_of(&password, CHALLENGE), DIGEST);
        assert!(verify(&password, CHALLENGE, DIGEST));
        assert!(verify(&password, CHALLENGE, &DIGEST.to_uppercase()));
        assert!(!verify(&Secret::new("tanstaaftanstaaF"), CHALLENGE, DIGEST));
        assert!(!verify(
            &password,
            "<1897.697170952@postoffice.reston.mci.net>",
            DIGEST
        ));
        assert!(!verify(&password, CHALLENGE, &DIGEST[..31]));
        assert!(!verify(&password, CHALLENGE, ""));
    }

    #[test]
    fn challenges_are_unique_and_name_the_host() {
        let first = challenge("relay.test", 1_700_000_000);
        let second = challenge("relay.test", 1_700_000_000);
        assert_ne!(first, second);
        assert!(
            first.starts_with('<') && first.ends_with(".1700000000@relay.test>"),
            "{first}"
        );
    }
}
