//! The status page: one server-rendered HTML document with inline CSS and
//! no scripts or external assets. Every piece of text from outside (account
//! names, replies, addresses) goes through [`escape`].

use std::fmt::Write;

use super::status::{AccountStatus, Rejection, Status};
use crate::notify::Recent;
use crate::routes::RouteView;
use crate::spool::unix_millis;
use crate::terminal::format_time;

const STYLE: &str = "
body{font:15px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:62rem;padding:0 1rem;color:#1d2430;background:#f5f6f8}
h1{font-size:1.35rem;margin-bottom:.2rem}
h2{font-size:1.05rem;margin:1.8rem 0 .6rem}
.muted{color:#5c6675;font-size:.9rem}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0002}
th,td{text-align:left;padding:.5rem .6rem;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#eceff3;font-weight:600;font-size:.9rem}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.nowrap{white-space:nowrap}
.ok{color:#116329;font-weight:600}
.hold{color:#a40e26;font-weight:600}
.reply{font-family:ui-monospace,monospace;font-size:.82rem;word-break:break-word}
.hint{margin-top:.3rem;padding:.35rem .5rem;background:#fff4d6;border-left:3px solid #d9a400}
.counts{display:flex;gap:.6rem;flex-wrap:wrap}
.counts div{background:#fff;padding:.5rem 1rem;box-shadow:0 1px 2px #0002;min-width:6rem}
.counts b{display:block;font-size:1.4rem}
form{display:inline;margin:0}
button{font:inherit;font-size:.85rem;padding:.25rem .6rem;margin:0 .3rem .3rem 0;cursor:pointer;white-space:nowrap}
.notice{background:#e6f4ea;border:1px solid #b7dfc1;padding:.5rem .8rem}
";

/// What the page needs besides the status.
pub struct PageContext<'a> {
    /// Embedded in every form; see `access::FormToken`.
    pub form_token: &'a str,
    /// The admin token when the page was opened with `?token=`, so that
    /// links and forms keep working.
    pub access_token: Option<&'a str>,
    /// How many messages the last retry made due, after a form post.
    pub retried: Option<usize>,
}

pub fn render(status: &Status, page: &PageContext) -> String {
    let query = page
        .access_token
        .map_or(String::new(), |token| format!("?token={}", escape(token)));
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>sendbridge status</title><style>{STYLE}</style></head><body>\
         <h1>sendbridge status</h1>\
         <p class=\"muted\">As of {} · <a href=\"/{query}\">Reload</a> · \
         <a href=\"/status.json{query}\">JSON</a> · <a href=\"/metrics{query}\">Metrics</a></p>",
        format_time(unix_millis())
    );
    if let Some(count) = page.retried {
        let _ = write!(
            html,
            "<p class=\"notice\" id=\"notice\">{count} message(s) are due again; the relay is sending them now.</p>"
        );
    }
    html += "<h2>Accounts</h2><table id=\"accounts\"><tr><th>Account</th><th>Transport</th>\
             <th>State</th><th class=\"n\">Held</th><th class=\"n\">Rejected</th><th>Actions</th></tr>";
    for account in &status.accounts {
        account_row(&mut html, account, page, &query);
    }
    if status.accounts.is_empty() {
        html += "<tr><td colspan=\"6\">No upstream account configured.</td></tr>";
    }
    html += "</table><h2>Queue</h2><div class=\"counts\" id=\"queue\">";
    for (state, count) in &status.queue {
        let _ = write!(html, "<div>{}<b>{count}</b></div>", escape(state));
    }
    html += "</div><h2>Last rejections</h2>";
    rejections(&mut html, &status.rejections);
    html += "<h2>Recent notices</h2>";
    notices(&mut html, &status.notices);
    html += "<h2>Routes</h2>";
    routes(&mut html, &status.routes);
    html += "<p class=\"muted\">Retrying makes the messages due now, as \
             <code>sendbridge queue retry</code> does; held mail also checks \
             whether the account can sign in again.</p></body></html>";
    html
}

fn account_row(html: &mut String, account: &AccountStatus, page: &PageContext, query: &str) {
    let name = escape(&account.name);
    let state = match &account.hold {
        None => "<span class=\"ok\">ok</span>".to_string(),
        Some(hold) => format!(
            "<span class=\"hold\">on hold</span><div class=\"reply\">{}</div>\
             <div class=\"hint\">What to do: {}</div>",
            escape(&hold.reply),
            escape(&hold.hint)
        ),
    };
    let _ = write!(
        html,
        "<tr id=\"account-{name}\"><td>{name}</td><td>{}</td><td>{state}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td>",
        escape(&account.transport),
        account.held,
        account.rejected
    );
    for (state, count) in [("held", account.held), ("rejected", account.rejected)] {
        if count > 0 {
            let _ = write!(
                html,
                "<form method=\"post\" action=\"/retry{query}\">\
                 <input type=\"hidden\" name=\"account\" value=\"{name}\">\
                 <input type=\"hidden\" name=\"state\" value=\"{state}\">\
                 <input type=\"hidden\" name=\"form_token\" value=\"{}\">\
                 <button type=\"submit\">Retry {state} mail ({count})</button></form>",
                escape(page.form_token)
            );
        }
    }
    *html += "</td></tr>";
}

fn rejections(html: &mut String, rejections: &[Rejection]) {
    let rows = rejections.iter().map(|rejection| {
        [
            (NOWRAP, format_time(rejection.at)),
            (REPLY, escape(&rejection.id)),
            (PLAIN, escape(&rejection.account)),
            (PLAIN, escape(&rejection.recipients.join(", "))),
            (
                REPLY,
                lines_html(rejection.last_reply.as_deref().unwrap_or("-")),
            ),
        ]
    });
    let header = ["Time", "Id", "Account", "Recipients", "Last reply"];
    table(html, "rejections", "None.", header, rows);
}

fn notices(html: &mut String, notices: &[Recent]) {
    let rows = notices.iter().map(|notice| {
        [
            (NOWRAP, format_time(notice.at)),
            (PLAIN, escape(&notice.event)),
            (PLAIN, escape(&notice.to)),
            (PLAIN, escape(&notice.channel)),
            (REPLY, escape(&notice.outcome)),
        ]
    });
    let header = ["Time", "Event", "To", "Channel", "Outcome"];
    table(
        html,
        "notices",
        "None since the relay started.",
        header,
        rows,
    );
}

fn routes(html: &mut String, routes: &[RouteView]) {
    let rows = routes.iter().enumerate().map(|(n, route)| {
        [
            (PLAIN, (n + 1).to_string()),
            (PLAIN, escape(&route.sender)),
            (PLAIN, route.matched_on().to_string()),
            (PLAIN, escape(&route.for_whom())),
            (PLAIN, escape(&route.account)),
        ]
    });
    let header = ["#", "Sender", "Matched on", "For", "Account"];
    let empty = "None: every user sends through its own account (users.&lt;name&gt;.account).";
    table(html, "routes", empty, header, rows);
}

/// The class attribute of a table cell.
const PLAIN: &str = "";
const NOWRAP: &str = " class=\"nowrap\"";
const REPLY: &str = " class=\"reply\"";

/// A table `id` of `rows` (each cell already HTML, with its class), or a
/// paragraph saying `empty` when there are none.
fn table<const N: usize>(
    html: &mut String,
    id: &str,
    empty: &str,
    header: [&str; N],
    rows: impl ExactSizeIterator<Item = [(&'static str, String); N]>,
) {
    if rows.len() == 0 {
        let _ = write!(html, "<p id=\"{id}\">{empty}</p>");
        return;
    }
    let _ = write!(html, "<table id=\"{id}\"><tr>");
    for title in header {
        let _ = write!(html, "<th>{title}</th>");
    }
    *html += "</tr>";
    for row in rows {
        *html += "<tr>";
        for (class, cell) in row {
            let _ = write!(html, "<td{class}>{cell}</td>");
        }
        *html += "</tr>";
    }
    *html += "</table>";
}

/// A provider's reply, escaped, its lines kept as line breaks: the last
/// line often has the link to the provider's help.
fn lines_html(text: &str) -> String {
    text.split('\n')
        .map(escape)
        .collect::<Vec<_>>()
        .join("<br>")
}

/// Text and attribute values safe in HTML.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::status::HoldStatus;

    #[test]
    fn escapes_everything_from_outside() {
        assert_eq!(
            escape("<a href='x'>\"&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
        );
        let status = Status {
            accounts: vec![AccountStatus {
                name: "gmail".into(),
                transport: "smtp".into(),
                hold: Some(HoldStatus {
                    reply: "535 5.7.8 <script>alert(1)</script>".into(),
                    hint: "set \"password\"".into(),
                }),
                held: 1,
                rejected: 0,
            }],
            queue: [("held".to_string(), 1)].into(),
            rejections: vec![Rejection {
                id: "0001".into(),
                account: "gmail".into(),
                at: 0,
                recipients: vec!["<x@example.com>".into()],
                last_reply: Some("550 5.1.1 <no such user>\n https://help/?p=NoSuchUser&x".into()),
            }],
            notices: vec![Recent {
                at: 0,
                event: "bounce".into(),
                to: "<b@example.com>".into(),
                channel: "email".into(),
                outcome: "queued as 0002 via gmail".into(),
            }],
            routes: vec![RouteView {
                sender: "<i>@x.example".into(),
                matches: crate::config::RouteMatch::From,
                account: "gmail".into(),
                users: vec!["invoices".into()],
            }],
        };
        let page = PageContext {
            form_token: "f0",
            access_token: None,
            retried: None,
        };

        let html = render(&status, &page);

        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&lt;x@example.com&gt;"));
        assert!(
            html.contains("&lt;b@example.com&gt;"),
            "notices listed: {html}"
        );
        assert!(
            html.contains("550 5.1.1 &lt;no such user&gt;<br> https://help/?p=NoSuchUser&amp;x"),
            "the whole reply, line by line: {html}"
        );
        assert!(
            html.contains(
                "<td>&lt;i&gt;@x.example</td><td>From field</td><td>invoices</td><td>gmail</td>"
            ),
            "routes listed: {html}"
        );
        assert!(html.contains("Retry held mail (1)"));
        assert!(!html.contains("Retry rejected mail"), "nothing to retry");
    }
}
