//! Where in a TOML file a mistake is, in words an operator can act on: "line 12, key
//! `sync.batch_size`: ...". Shared by the agent's config and the receiver's price book.

/// `message`, placed at the line holding `offset` and, when known, its key.
pub fn placed(text: &str, offset: usize, key: Option<&str>, message: &str) -> String {
    let offset = offset.min(text.len());
    let line = text[..offset].matches('\n').count() + 1;
    match key {
        Some(key) => format!("line {line}, key `{key}`: {message}"),
        None => format!("line {line}: {message}"),
    }
}

/// A TOML reading error placed at its line and key.
pub fn describe(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => placed(
            text,
            span.start,
            key_at(text, span.start).as_deref(),
            error.message(),
        ),
        None => error.message().to_owned(),
    }
}

/// The key assigned on the line holding `offset`, qualified by the table it is in
/// (`sync.batch_size`, `model.input_per_mtok`).
pub fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let table = before[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(['[', ']']).trim().to_owned())
    });
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mistake_is_placed_at_its_line_and_qualified_key() {
        let text = "a = 1\n[sync]\nbatch_size = \"x\"\n";
        let offset = text.find("\"x\"").unwrap();
        assert_eq!(key_at(text, offset).as_deref(), Some("sync.batch_size"));
        assert_eq!(
            placed(text, offset, Some("sync.batch_size"), "must be a number"),
            "line 3, key `sync.batch_size`: must be a number"
        );
        assert_eq!(key_at(text, 0).as_deref(), Some("a"));
        assert_eq!(placed(text, text.len() + 5, None, "m"), "line 4: m");
    }
}
