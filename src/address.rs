//! Envelope addresses as RFC 5321 writes them (`MAIL FROM:<path>`,
//! `RCPT TO:<path>`), parsed from the client's own command line and kept in
//! that form end to end. smtp-proto hands back a quoted local part without
//! its quotes, so `"victim@evil> NOTIFY=…"@c` would go upstream as a
//! different recipient with injected parameters; parsing the raw path here
//! and re-quoting what needs quotes keeps the recipient that is logged,
//! queued and sent the same.

/// Paths longer than this are refused (RFC 5321 4.5.3.1.3).
const MAX_PATH: usize = 256;

/// Which command the path came from: only RCPT may name a bare
/// `postmaster`, only MAIL may be empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Recipient,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AddressError {
    /// Not an RFC 5321 path.
    Syntax,
    /// A control character (NUL, CR, ESC, DEL, …), quoted or not.
    ControlCharacter,
    /// Non-ASCII without SMTPUTF8 on MAIL FROM (RFC 6531).
    NeedsSmtpUtf8,
}

/// The address in `line`, a whole `MAIL FROM:` or `RCPT TO:` command:
/// the path between the first `<` after the colon and its matching `>`, in
/// canonical form (`""` for the null sender, `postmaster` for the bare
/// postmaster recipient). `smtputf8`: the transaction declared SMTPUTF8.
pub fn parse_command_path(line: &[u8], role: Role, smtputf8: bool) -> Result<String, AddressError> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(AddressError::Syntax)?;
    let rest = &line[colon + 1..];
    let open = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .filter(|&at| rest[at] == b'<')
        .ok_or(AddressError::Syntax)?;
    let path = path_inside_brackets(&rest[open + 1..])?;
    parse_path(path, role, smtputf8)
}

/// The bytes up to the `>` that closes the path, which may stand inside a
/// quoted local part.
fn path_inside_brackets(rest: &[u8]) -> Result<&[u8], AddressError> {
    let mut quoted = false;
    let mut escaped = false;
    for (at, &byte) in rest.iter().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Ok(&rest[..at]),
            _ => {}
        }
    }
    Err(AddressError::Syntax)
}

/// Parses what stands between `<` and `>`.
pub fn parse_path(path: &[u8], role: Role, smtputf8: bool) -> Result<String, AddressError> {
    if path.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(AddressError::ControlCharacter);
    }
    if path.len() > MAX_PATH {
        return Err(AddressError::Syntax);
    }
    if !path.is_ascii() && !smtputf8 {
        return Err(AddressError::NeedsSmtpUtf8);
    }
    let path = std::str::from_utf8(path).map_err(|_| AddressError::Syntax)?;
    match (path, role) {
        ("", Role::Sender) => return Ok(String::new()),
        (postmaster, Role::Recipient) if postmaster.eq_ignore_ascii_case("postmaster") => {
            return Ok(postmaster.to_string());
        }
        _ => {}
    }
    let mailbox = strip_source_route(path)?;
    let (local, domain) = split_mailbox(mailbox)?;
    if !is_domain(domain) {
        return Err(AddressError::Syntax);
    }
    Ok(format!("{}@{domain}", canonical_local_part(&local)))
}

/// `@a.example,@b.example:user@c.example` → `user@c.example`: source
/// routes are obsolete and ignored (RFC 5321 4.1.2, appendix C).
fn strip_source_route(path: &str) -> Result<&str, AddressError> {
    if !path.starts_with('@') {
        return Ok(path);
    }
    let (route, mailbox) = path.split_once(':').ok_or(AddressError::Syntax)?;
    if route
        .split(',')
        .all(|hop| hop.strip_prefix('@').is_some_and(is_domain))
    {
        Ok(mailbox)
    } else {
        Err(AddressError::Syntax)
    }
}

/// The local part (unquoted, unescaped) and the domain.
fn split_mailbox(mailbox: &str) -> Result<(String, &str), AddressError> {
    if let Some(quoted) = mailbox.strip_prefix('"') {
        let mut local = String::new();
        let mut chars = quoted.char_indices();
        while let Some((at, c)) = chars.next() {
            match c {
                '\\' => local.push(chars.next().ok_or(AddressError::Syntax)?.1),
                '"' => {
                    let domain = quoted[at + 1..]
                        .strip_prefix('@')
                        .ok_or(AddressError::Syntax)?;
                    return Ok((local, domain));
                }
                c => local.push(c),
            }
        }
        return Err(AddressError::Syntax);
    }
    let (local, domain) = mailbox.rsplit_once('@').ok_or(AddressError::Syntax)?;
    if !is_dot_string(local) {
        return Err(AddressError::Syntax);
    }
    Ok((local.to_string(), domain))
}

/// The local part as it must be written: bare when it is a dot-string,
/// otherwise quoted with `"` and `\` escaped.
fn canonical_local_part(local: &str) -> String {
    if is_dot_string(local) {
        return local.to_string();
    }
    let mut quoted = String::with_capacity(local.len() + 2);
    quoted.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// RFC 5321 Dot-string: atoms of atext joined by single dots (UTF-8 is
/// atext under SMTPUTF8, which the caller has checked).
fn is_dot_string(text: &str) -> bool {
    let is_atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    !text.is_empty()
        && text
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// A domain name (letters, digits, hyphens, and the underscores real
/// networks use) or an address literal such as `[192.0.2.1]`.
fn is_domain(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return !literal.is_empty()
            && literal
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:-".contains(c));
    }
    let is_label_char =
        |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii();
    !domain.is_empty()
        && domain.len() <= 255
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(is_label_char)
        })
}

/// A `[[routes]]` sender: addresses compare as RFC 5321 says, the domain
/// in any case, the local part exactly (`Invoices@x.example` is another
/// mailbox than `invoices@x.example`).
#[derive(Debug, PartialEq, Eq)]
pub enum SenderPattern {
    /// `*`: every sender, the null sender too.
    Any,
    /// `@x.example`, lower-case.
    Domain(String),
    /// `local@x.example`: the local part as written, the domain lower-case.
    Address { local: String, domain: String },
}

impl SenderPattern {
    /// Or the sentence saying what a pattern looks like.
    pub fn parse(sender: &str) -> Result<SenderPattern, &'static str> {
        const FORMS: &str =
            "write an address (a@x.example), a domain (@x.example) or * for every sender";
        let sender = sender.trim();
        if sender == "*" {
            return Ok(SenderPattern::Any);
        }
        let Some((local, domain)) = sender.rsplit_once('@') else {
            return Err(FORMS);
        };
        if domain.is_empty() || domain.contains(['<', '>', ' ']) || local.contains(['<', '>']) {
            return Err(FORMS);
        }
        let domain = domain.to_ascii_lowercase();
        Ok(match local {
            "" => SenderPattern::Domain(domain),
            local => SenderPattern::Address {
                local: local.to_string(),
                domain,
            },
        })
    }

    /// `address` in RFC 5321 form; `""`, the null sender, matches `*` only.
    pub fn matches(&self, address: &str) -> bool {
        match (self, address.rsplit_once('@')) {
            (SenderPattern::Any, _) => true,
            (SenderPattern::Domain(domain), Some((_, theirs))) => {
                theirs.eq_ignore_ascii_case(domain)
            }
            (SenderPattern::Address { local, domain }, Some((their_local, theirs))) => {
                their_local == local && theirs.eq_ignore_ascii_case(domain)
            }
            (_, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressError::*;

    /// Each command line, parsed without SMTPUTF8, gives its result.
    fn check(role: Role, cases: &[(&str, Result<&str, AddressError>)]) {
        for (line, expected) in cases {
            let parsed = parse_command_path(line.as_bytes(), role, false);
            assert_eq!(parsed.as_deref(), expected.as_ref().map(|s| *s), "{line}");
        }
    }

    #[test]
    fn sender_patterns_are_an_address_a_domain_or_a_star() {
        use SenderPattern::*;
        let address = |local: &str, domain: &str| Address {
            local: local.into(),
            domain: domain.into(),
        };
        let cases: [(&str, Result<SenderPattern, ()>); 8] = [
            ("*", Ok(Any)),
            ("@X.Example", Ok(Domain("x.example".into()))),
            ("Invoices@X.example", Ok(address("Invoices", "x.example"))),
            ("\"a b\"@x.example", Ok(address("\"a b\"", "x.example"))),
            ("x.example", Err(())),
            ("a@", Err(())),
            ("<a@x.example>", Err(())),
            ("", Err(())),
        ];
        for (written, expected) in cases {
            let parsed = SenderPattern::parse(written).map_err(drop);
            assert_eq!(parsed, expected, "{written:?}");
        }
    }

    #[test]
    fn sender_patterns_match_the_domain_in_any_case_and_the_local_part_exactly() {
        // (pattern, address, matches)
        let cases = [
            ("*", "", true),
            ("*", "a@b.example", true),
            ("@office.example", "a@OFFICE.Example", true),
            ("@office.example", "a@sub.office.example", false),
            ("@office.example", "", false),
            ("Invoices@office.example", "Invoices@Office.example", true),
            ("Invoices@office.example", "invoices@office.example", false),
            ("\"a b\"@x.example", "\"a b\"@x.example", true),
        ];
        for (pattern, address, matches) in cases {
            let pattern = SenderPattern::parse(pattern).unwrap();
            assert_eq!(pattern.matches(address), matches, "{pattern:?} {address:?}");
        }
    }

    #[test]
    fn recipients_keep_their_rfc_5321_form() {
        let cases: &[(&str, Result<&str, AddressError>)] = &[
            ("RCPT TO:<a@b.example>", Ok("a@b.example")),
            (
                "RCPT TO: <first.last+tag@b.example> NOTIFY=NEVER",
                Ok("first.last+tag@b.example"),
            ),
            // The injection: the quoted local part stays one recipient.
            (
                r#"RCPT TO:<"victim@evil.example> NOTIFY=SUCCESS ORCPT=rfc822;x"@c.example>"#,
                Ok(r#""victim@evil.example> NOTIFY=SUCCESS ORCPT=rfc822;x"@c.example"#),
            ),
            (r#"RCPT TO:<"a b"@c>"#, Ok(r#""a b"@c"#)),
            // Quotes that are not needed go; escapes that are needed stay.
            (r#"RCPT TO:<"plain"@c.example>"#, Ok("plain@c.example")),
            (r#"RCPT TO:<"a\"b"@c>"#, Ok(r#""a\"b"@c"#)),
            (r#"RCPT TO:<"a\\b"@c>"#, Ok(r#""a\\b"@c"#)),
            (r#"RCPT TO:<"a\xb"@c>"#, Ok("axb@c")),
            ("RCPT TO:<postmaster>", Ok("postmaster")),
            ("RCPT TO:<PostMaster>", Ok("PostMaster")),
            (
                "RCPT TO:<@relay.example,@x.example:a@b.example>",
                Ok("a@b.example"),
            ),
            ("RCPT TO:<a@[192.0.2.1]>", Ok("a@[192.0.2.1]")),
            ("RCPT TO:<a@my_host.example>", Ok("a@my_host.example")),
            ("RCPT TO:<\"a\0b\"@c>", Err(ControlCharacter)),
            ("RCPT TO:<a\x1b[31m@c>", Err(ControlCharacter)),
            ("RCPT TO:<\"a\x7f\"@c>", Err(ControlCharacter)),
            ("RCPT TO:<>", Err(Syntax)),
            ("RCPT TO:<a..b@c>", Err(Syntax)),
            ("RCPT TO:<a@>", Err(Syntax)),
            ("RCPT TO:<a@b..c>", Err(Syntax)),
            ("RCPT TO:<a@-b>", Err(Syntax)),
            ("RCPT TO:<\"unterminated@c>", Err(Syntax)),
            ("RCPT TO:<a@b", Err(Syntax)),
            ("RCPT TO:<a b@c>", Err(Syntax)),
            ("RCPT TO:<pöstmaster@c.example>", Err(NeedsSmtpUtf8)),
        ];
        check(Role::Recipient, cases);
    }

    #[test]
    fn senders_may_be_null_but_not_a_bare_postmaster() {
        let cases: &[(&str, Result<&str, AddressError>)] = &[
            ("MAIL FROM:<>", Ok("")),
            ("MAIL FROM:<a@b.example> SIZE=10", Ok("a@b.example")),
            ("MAIL FROM:<postmaster>", Err(Syntax)),
            ("MAIL FROM:<\"x\ty\"@c>", Err(ControlCharacter)),
            ("MAIL FROM:<ünicode@b.example>", Err(NeedsSmtpUtf8)),
            ("MAIL FROM:a@b.example", Err(Syntax)),
        ];
        check(Role::Sender, cases);
    }

    #[test]
    fn utf8_addresses_pass_with_smtputf8() {
        let line = "RCPT TO:<jörg@bücher.example>".as_bytes();
        assert_eq!(
            parse_command_path(line, Role::Recipient, true).as_deref(),
            Ok("jörg@bücher.example")
        );
    }

    #[test]
    fn paths_are_bounded() {
        let long = format!("RCPT TO:<{}@b.example>", "a".repeat(250));
        assert_eq!(
            parse_command_path(long.as_bytes(), Role::Recipient, false),
            Err(Syntax)
        );
    }
}
