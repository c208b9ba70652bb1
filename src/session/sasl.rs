//! SASL PLAIN, LOGIN and CRAM-MD5 (RFC 4616, RFC 4954, RFC 2195):
//! decoding the client's responses into a user name and password (or
//! CRAM-MD5 digest) for the AUTH phase.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::secret::Secret;

/// Why a SASL exchange did not yield credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslError {
    /// The client sent `*`.
    Cancelled,
    /// Not base64, or not the mechanism's format.
    Malformed,
}

/// A client's answer to a 334 challenge.
pub fn decode_response(line: &str) -> Result<Vec<u8>, SaslError> {
    match line.trim() {
        "*" => Err(SaslError::Cancelled),
        // RFC 4954: "=" is an empty initial response.
        "=" => Ok(Vec::new()),
        text => BASE64.decode(text).map_err(|_| SaslError::Malformed),
    }
}

/// PLAIN (RFC 4616): `authzid NUL authcid NUL password`. We sign in as
/// authcid; an authzid naming someone else is refused rather than ignored.
pub fn parse_plain(decoded: &[u8]) -> Result<(String, Secret), SaslError> {
    let mut parts = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| SaslError::Malformed);
    let (authzid, authcid) = (text(authzid)?, text(authcid)?);
    if authcid.is_empty() || (!authzid.is_empty() && authzid != authcid) {
        return Err(SaslError::Malformed);
    }
    Ok((authcid, Secret::new(text(password)?)))
}

/// One LOGIN field (user name or password): base64 of UTF-8 text.
pub fn parse_login_field(decoded: Vec<u8>) -> Result<String, SaslError> {
    String::from_utf8(decoded).map_err(|_| SaslError::Malformed)
}

/// CRAM-MD5 (RFC 2195): `user SP digest`, the digest 32 hex digits. The
/// user name may hold spaces; the digest cannot.
pub fn parse_cram_md5(decoded: &[u8]) -> Result<(String, String), SaslError> {
    let text = std::str::from_utf8(decoded).map_err(|_| SaslError::Malformed)?;
    let (user, digest) = text.rsplit_once(' ').ok_or(SaslError::Malformed)?;
    if user.is_empty() || digest.len() != 32 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SaslError::Malformed);
    }
    Ok((user.to_string(), digest.to_string()))
}

/// A 334 challenge's text.
pub fn encode_challenge(challenge: &str) -> String {
    BASE64.encode(challenge)
}

pub const LOGIN_USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6"; // "Username:"
pub const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6"; // "Password:"

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_splits_on_nul() {
        let (user, password) = parse_plain(b"\0invoices\0old-password").unwrap();
        assert_eq!(
            (user.as_str(), password.expose()),
            ("invoices", "old-password")
        );
        assert!(parse_plain(b"invoices\0invoices\0pw").is_ok());
        assert_eq!(
            parse_plain(b"admin\0invoices\0pw").unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            parse_plain(b"no-separators").unwrap_err(),
            SaslError::Malformed
        );
    }

    #[test]
    fn cram_md5_is_a_user_a_space_and_a_hex_digest() {
        let digest = "b913a602c7eda7a495b4e6e7334d3890";
        // (decoded response, user and digest)
        type Case<'a> = (&'a [u8], Option<(&'a str, &'a str)>);
        let cases: [Case; 7] = [
            (
                b"tim b913a602c7eda7a495b4e6e7334d3890",
                Some(("tim", digest)),
            ),
            (
                b"first last b913a602c7eda7a495b4e6e7334d3890",
                Some(("first last", digest)),
            ),
            (
                b"tim B913A602C7EDA7A495B4E6E7334D3890",
                Some(("tim", "B913A602C7EDA7A495B4E6E7334D3890")),
            ),
            (b"timb913a602c7eda7a495b4e6e7334d3890", None),
            (b" b913a602c7eda7a495b4e6e7334d3890", None),
            (b"tim b913a602c7eda7a495b4e6e7334d389", None),
            (b"tim zz13a602c7eda7a495b4e6e7334d3890", None),
        ];
        for (decoded, expected) in cases {
            let parsed = parse_cram_md5(decoded).ok();
            let parsed = parsed.as_ref().map(|(u, d)| (u.as_str(), d.as_str()));
            assert_eq!(parsed, expected, "{:?}", String::from_utf8_lossy(decoded));
        }
        // RFC 2195's example response, as the client sends it.
        let decoded = decode_response("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw").unwrap();
        assert_eq!(
            parse_cram_md5(&decoded).unwrap(),
            ("tim".to_string(), digest.to_string())
        );
        assert_eq!(
            encode_challenge("<1896.697170952@postoffice.reston.mci.net>"),
            "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
        );
    }

    #[test]
    fn responses_decode_cancel_and_empty() {
        assert_eq!(decode_response("*"), Err(SaslError::Cancelled));
        assert_eq!(decode_response("="), Ok(Vec::new()));
        assert_eq!(decode_response("aGk="), Ok(b"hi".to_vec()));
        assert_eq!(decode_response("not base64!"), Err(SaslError::Malformed));
    }
}
