//! What every dashboard page shares: the layout (a viewport, a style that reads from a
//! 400 px wide screen up, wide tables scrolling inside their own box), the security
//! headers of an HTML answer, and the HTML page an error becomes.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::http::error::ReceiverError;
use usage_protocol::event::format_millis;

/// No scripts, no fetches, no frames; forms only to the receiver itself (the search form):
/// only inline styles and the inline SVG.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     img-src data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const STYLE: &str = "*{box-sizing:border-box}\
body{font:14px system-ui,sans-serif;margin:1.5em auto;padding:0 1em;max-width:1400px;color:#222}\
h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.15em;margin:1.4em 0 .4em}\
.scroll{overflow-x:auto;max-width:100%;border:1px solid #eee}\
table{border-collapse:collapse;margin:0}th,td{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:left}\
th{background:#f6f6f6;white-space:nowrap}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.neg{color:#b00}\
td.n,.nowrap{white-space:nowrap}code{font-size:12px}h1 code,#by-user code{overflow-wrap:anywhere}\
th a{color:inherit}.muted{color:#666;font-size:12px}.pages b{padding:0 .2em}\
.badge{display:inline-block;padding:0 .4em;border-radius:.6em;background:#f3c969;font-size:12px}\
.badge.over{background:#e06666;color:#fff}.unpriced{color:#8a5a00;font-style:italic}\
.totals{display:flex;flex-wrap:wrap;gap:.5em;margin:1em 0;padding:0}\
.totals div{flex:1 1 9em;border:1px solid #ddd;border-radius:4px;padding:.4em .6em;background:#fbfbfb}\
.totals dt{font-size:12px;color:#555}.totals dd{margin:0;font-size:1.15em;font-weight:600;\
font-variant-numeric:tabular-nums}\
.chart svg{width:100%;height:auto;max-width:1000px;display:block;background:#fafafa}\
.legend{list-style:none;padding:0;margin:.3em 0;display:flex;flex-wrap:wrap;gap:.3em 1em;font-size:12px}\
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}\
form.search{display:flex;flex-wrap:wrap;gap:.4em;align-items:center;margin:.6em 0}\
form.search input[type=search]{min-width:12em;flex:1 1 12em;max-width:24em}\
nav.pages,p.periods{line-height:1.8}\
.note{background:#fff7e0;border:1px solid #f0d890;padding:.4em .6em;border-radius:4px}\
@media (max-width:600px){body{margin:.6em auto;padding:0 .5em}th,td{padding:.25em .4em}}";

/// The page around `body`: title, style, and when it was made.
pub fn layout(title: &str, now: DateTime<Utc>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                (body)
                p.muted { "As of " (format_millis(now.timestamp_millis())) " (UTC)." }
            }
        }
    }
}

/// An HTML answer with the security headers.
pub fn html_response(markup: Markup) -> Response {
    let mut response = markup.into_string().into_response();
    secure_html(&mut response);
    response
}

fn secure_html(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// An error of a browser page as an HTML page with a link back to the dashboard: the
/// status, headers (a `401`'s challenge, a `503`'s `Retry-After`) and error code of the
/// JSON answer are kept, only the body is a page.
pub fn error_page(error: ReceiverError, now: DateTime<Utc>) -> Response {
    let heading = match error.status.as_u16() {
        400 => "That view cannot be shown",
        401 => "Sign in to see the dashboard",
        404 => "Not found",
        503 => "The database is not answering",
        _ => "Something went wrong",
    };
    let message = error.message.clone();
    let mut response = error.into_response();
    let body = layout(
        heading,
        now,
        html! {
            h1 { (heading) }
            p #error-message { (message) }
            p { a href="/dashboard" { "Back to the dashboard" } }
        },
    );
    *response.body_mut() = axum::body::Body::from(body.into_string());
    response.headers_mut().remove(header::CONTENT_LENGTH);
    secure_html(&mut response);
    response
}
