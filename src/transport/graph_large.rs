//! Messages over Graph's request limit: the MIME without its largest
//! attachments (small enough to create a draft from), and those attachments
//! decoded, to be attached to the draft one by one ("Attach large files to
//! Outlook messages": an upload session for 3 MB to 150 MB).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_parser::{MessageParser, MimeHeaders};

/// An attachment taken out of the MIME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub name: String,
    pub content_type: String,
    pub content_id: Option<String>,
    pub inline: bool,
    /// Decoded.
    pub content: Vec<u8>,
}

impl Attachment {
    /// A `fileAttachment` resource for `POST …/attachments`.
    pub fn as_json(&self) -> Vec<u8> {
        let mut json = serde_json::json!({
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": self.name,
            "contentType": self.content_type,
            "isInline": self.inline,
            "contentBytes": BASE64.encode(&self.content),
        });
        if let Some(id) = &self.content_id {
            json["contentId"] = id.clone().into();
        }
        json.to_string().into_bytes()
    }

    /// The body of `createUploadSession`.
    pub fn upload_session_json(&self) -> Vec<u8> {
        let mut item = serde_json::json!({
            "attachmentType": "file",
            "name": self.name,
            "size": self.content.len(),
            "contentType": self.content_type,
            "isInline": self.inline,
        });
        if let Some(id) = &self.content_id {
            item["contentId"] = id.clone().into();
        }
        serde_json::json!({ "AttachmentItem": item })
            .to_string()
            .into_bytes()
    }
}

/// The MIME without its largest attachments, just enough of them that the
/// rest base64-encodes to at most `max_encoded` bytes, and those
/// attachments; `None` when no choice of attachments gets it that small.
pub fn split_attachments(mime: &[u8], max_encoded: usize) -> Option<(Vec<u8>, Vec<Attachment>)> {
    let message = MessageParser::new().parse(mime)?;
    // (range of the part with the delimiter line before it, attachment)
    let mut parts: Vec<_> = message
        .attachments()
        .filter_map(|part| {
            let start = delimiter_start(mime, part.raw_header_offset() as usize)?;
            let content_type = part.content_type().map_or_else(
                || "application/octet-stream".to_string(),
                |ct| match ct.subtype() {
                    Some(subtype) => format!("{}/{subtype}", ct.ctype()),
                    None => ct.ctype().to_string(),
                },
            );
            let inline = part
                .content_disposition()
                .is_some_and(|cd| cd.ctype().eq_ignore_ascii_case("inline"));
            let attachment = Attachment {
                name: part.attachment_name().unwrap_or("attachment").to_string(),
                content_type,
                content_id: part.content_id().map(str::to_string),
                inline,
                content: part.contents().to_vec(),
            };
            Some((start..part.raw_end_offset() as usize, attachment))
        })
        .collect();
    parts.sort_by_key(|(range, _)| std::cmp::Reverse(range.len()));
    let encoded = |len: usize| len.div_ceil(3) * 4;
    let mut left = mime.len();
    let mut taken = Vec::new();
    for (range, attachment) in parts {
        if encoded(left) <= max_encoded {
            break;
        }
        left -= range.len();
        taken.push((range, attachment));
    }
    if encoded(left) > max_encoded {
        return None;
    }
    taken.sort_by_key(|(range, _)| range.start);
    let mut draft = Vec::with_capacity(left);
    let mut copied = 0;
    for (range, _) in &taken {
        draft.extend_from_slice(&mime[copied..range.start]);
        copied = range.end;
    }
    draft.extend_from_slice(&mime[copied..]);
    Some((draft, taken.into_iter().map(|(_, a)| a).collect()))
}

/// Where the CRLF and `--boundary` line before a part's header begin: the
/// part goes with its delimiter, and the next delimiter follows the part
/// before it as a delimiter must.
fn delimiter_start(mime: &[u8], header: usize) -> Option<usize> {
    let before = &mime[..header];
    let line_end = before.strip_suffix(b"\r\n")?;
    let line_start = line_end
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    line_end[line_start..].starts_with(b"--").then_some(())?;
    line_start.checked_sub(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(attachments: &[(&str, usize)]) -> Vec<u8> {
        let mut mime = b"From: me@contoso.com\r\nTo: a@example.com\r\nSubject: scans\r\n\
            MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
            --b1\r\nContent-Type: text/plain\r\n\r\nThe scans.\r\n"
            .to_vec();
        for (name, size) in attachments {
            let content = vec![name.as_bytes()[0]; *size];
            let encoded = BASE64.encode(content);
            let lines: Vec<&str> = encoded
                .as_bytes()
                .chunks(76)
                .map(|line| std::str::from_utf8(line).unwrap())
                .collect();
            mime.extend_from_slice(
                format!(
                    "--b1\r\nContent-Type: application/pdf; name=\"{name}\"\r\n\
                     Content-Disposition: attachment; filename=\"{name}\"\r\n\
                     Content-Transfer-Encoding: base64\r\n\r\n{}\r\n",
                    lines.join("\r\n")
                )
                .as_bytes(),
            );
        }
        mime.extend_from_slice(b"--b1--\r\n");
        mime
    }

    #[test]
    fn the_largest_attachments_come_out_until_the_rest_fits() {
        let mime = message(&[("a.pdf", 1000), ("b.pdf", 5000), ("c.pdf", 3000)]);
        // (limit, attachments taken out)
        let table: [(usize, Option<&[&str]>); 4] = [
            (usize::MAX, Some(&[])),
            (mime.len() * 4 / 3 - 100, Some(&["b.pdf"])),
            (1000, Some(&["b.pdf", "c.pdf", "a.pdf"])),
            (100, None),
        ];
        for (limit, taken) in table {
            let split = split_attachments(&mime, limit);
            let names = split.as_ref().map(|(_, attachments)| {
                attachments
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
            });
            let mut expected = taken.map(<[&str]>::to_vec);
            // Taken in the order they appear.
            if let Some(expected) = &mut expected {
                expected.sort();
            }
            assert_eq!(names, expected, "{limit}");
        }
    }

    #[test]
    fn the_draft_is_the_same_mime_less_the_parts_taken_out() {
        let mime = message(&[("a.pdf", 10), ("b.pdf", 5000)]);
        let (draft, taken) = split_attachments(&mime, mime.len()).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].content, vec![b'b'; 5000], "decoded");
        assert_eq!(taken[0].content_type, "application/pdf");
        assert!(!taken[0].inline);
        assert_eq!(draft, message(&[("a.pdf", 10)]));
        let parsed = MessageParser::new().parse(&draft).unwrap();
        assert_eq!(parsed.body_text(0).as_deref(), Some("The scans."));
        assert_eq!(parsed.attachments().count(), 1);
    }

    #[test]
    fn attachments_are_described_as_graph_takes_them() {
        let attachment = Attachment {
            name: "scan.pdf".into(),
            content_type: "application/pdf".into(),
            content_id: None,
            inline: false,
            content: b"%PDF".to_vec(),
        };
        let session: serde_json::Value =
            serde_json::from_slice(&attachment.upload_session_json()).unwrap();
        assert_eq!(
            session,
            serde_json::json!({"AttachmentItem": {"attachmentType": "file", "name": "scan.pdf", "size": 4, "contentType": "application/pdf", "isInline": false}})
        );
        let json: serde_json::Value = serde_json::from_slice(&attachment.as_json()).unwrap();
        assert_eq!(json["contentBytes"], "JVBERg==");
        assert_eq!(json["@odata.type"], "#microsoft.graph.fileAttachment");
    }
}
