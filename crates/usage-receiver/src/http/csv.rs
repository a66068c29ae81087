//! Answers as CSV: a header and records written by the `csv` crate, which quotes a cell
//! only where it must (labels and model names may hold commas or quotes).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// A `text/csv` answer of `columns` then `records`.
pub fn csv_answer<R, C>(columns: &[&str], records: R) -> Response
where
    R: IntoIterator<Item = C>,
    C: IntoIterator<Item = String>,
{
    let write = || -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record(columns)?;
        for record in records {
            writer.write_record(record)?;
        }
        Ok(writer.into_inner()?)
    };
    // Writing to memory cannot fail.
    let body = write().unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// Makes a CSV answer a download named `file_name` (letters, digits, `-`, `_` and `.`
/// only: anything else becomes `_`, so the header needs no quoting rules).
pub fn with_file_name(mut answer: Response, file_name: &str) -> Response {
    let safe: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        answer
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_plain() {
        let answer = with_file_name(csv_answer(&["a"], Vec::<Vec<String>>::new()), "x y\"/.csv");
        assert_eq!(
            answer.headers()[header::CONTENT_DISPOSITION],
            "attachment; filename=\"x_y__.csv\""
        );
    }

    #[tokio::test]
    async fn cells_are_quoted_only_where_they_must_be() {
        let answer = csv_answer(
            &["label", "events"],
            [vec!["Acme, Inc.".to_owned(), "3".to_owned()]],
        );
        assert_eq!(
            answer.headers()[header::CONTENT_TYPE],
            "text/csv; charset=utf-8"
        );
        let body = axum::body::to_bytes(answer.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"label,events\n\"Acme, Inc.\",3\n");
    }
}
