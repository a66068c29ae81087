//! Recognizes a `context` that is already in the form it is stored in, so recording it
//! needs no parse into a `Value` and no serialization back.
//!
//! A context is stored as serde_json writes the `Value` read from it: no whitespace, keys
//! in their order, strings and numbers as written. Most clients send exactly that, and
//! building the `Value` (a map per object, every key hashed) and writing it out again took
//! as much of a batch's reading as everything else in it. [`is_as_stored`] answers for the
//! texts it can prove are written back unchanged; anything else is left to the `Value`
//! reading, which is the reference.

use super::MAX_CONTEXT_DEPTH;

/// Most keys an object may have to be recognized here: duplicates are looked for by
/// comparing each key with those before it.
const MAX_KEYS: usize = 16;
/// Most digits of an integer recognized here: every such integer is read exactly (as
/// `u64` or `i64`) and written back with the same digits.
const MAX_DIGITS: usize = 18;

/// Whether `raw` is a JSON object that serde_json would write back byte for byte from the
/// `Value` read from it, nested at most [`MAX_CONTEXT_DEPTH`] deep; `false` also when that
/// is not provable here (escapes, fractions, exponents, whitespace, repeated or many keys).
pub fn is_as_stored(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    let mut scanner = Scanner { bytes, at: 0 };
    bytes.first() == Some(&b'{') && scanner.value(1).is_some() && scanner.at == bytes.len()
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    /// Reads one value at `depth` (objects and arrays count from 1).
    fn value(&mut self, depth: usize) -> Option<()> {
        match *self.bytes.get(self.at)? {
            b'{' => {
                let mut keys: [&[u8]; MAX_KEYS] = [&[]; MAX_KEYS];
                let mut count = 0;
                self.items(depth, b'}', |scanner| {
                    let key = scanner.string()?;
                    // A repeated key keeps its first place and its last value: not as
                    // written.
                    if count == MAX_KEYS || keys[..count].contains(&key) {
                        return None;
                    }
                    keys[count] = key;
                    count += 1;
                    scanner.eat(b':').then_some(())?;
                    scanner.value(depth + 1)
                })
            }
            b'[' => self.items(depth, b']', |scanner| scanner.value(depth + 1)),
            b'"' => self.string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.integer(),
        }
    }

    /// The items of the object or array opening at `depth`, each read by `item`, separated
    /// by commas up to `close`.
    fn items(
        &mut self,
        depth: usize,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if depth > MAX_CONTEXT_DEPTH {
            return None;
        }
        self.at += 1;
        if self.eat(close) {
            return Some(());
        }
        loop {
            item(self)?;
            if self.eat(close) {
                return Some(());
            }
            self.eat(b',').then_some(())?;
        }
    }

    /// A string without escapes (written back as it is); its contents.
    fn string(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => break,
                // An escape may be written back otherwise (`\/`, `\u00e9`); a control
                // character is not JSON.
                b'\\' | 0..0x20 => return None,
                _ => self.at += 1,
            }
        }
        let contents = &self.bytes[start..self.at];
        self.at += 1;
        Some(contents)
    }

    /// An integer of at most [`MAX_DIGITS`] digits without a leading zero; not `-0`,
    /// which is read as 0.
    fn integer(&mut self) -> Option<()> {
        let negative = self.eat(b'-');
        let start = self.at;
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        let digits = &self.bytes[start..self.at];
        let plain = match digits {
            [] => false,
            [b'0'] => !negative,
            [b'0', ..] => false,
            _ => digits.len() <= MAX_DIGITS,
        };
        // A fraction or an exponent follows: a float, written back in its own way.
        let ends = !matches!(self.bytes.get(self.at), Some(b'.' | b'e' | b'E'));
        (plain && ends).then_some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let found = self.bytes.get(self.at..self.at + word.len())? == word;
        self.at += word.len();
        found.then_some(())
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.bytes.get(self.at) == Some(&byte);
        self.at += usize::from(found);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// What the reference stores for a context: the `Value` read, written back.
    fn stored(raw: &str) -> String {
        serde_json::from_str::<Value>(raw)
            .expect("test contexts are JSON")
            .to_string()
    }

    #[test]
    fn contexts_in_stored_form_are_recognized_as_they_are() {
        for raw in [
            r#"{}"#,
            r#"{"post":42,"action":"alt_text"}"#,
            r#"{"a":{"b":[1,-2,0,true,false,null,"x"]},"c":[]}"#,
            r#"{"text":"é ü 字 🙂","n":999999999999999999,"m":-999999999999999999}"#,
            r#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":1}}}}}}}}"#,
        ] {
            assert!(is_as_stored(raw), "{raw}");
            assert_eq!(stored(raw), raw, "the reference writes {raw} back as it is");
        }
    }

    #[test]
    fn contexts_written_back_otherwise_are_left_to_the_reference() {
        for raw in [
            r#"{ "a":1}"#,
            "{\"a\":1}\n",
            r#"{"a":"x\/y"}"#,
            r#"{"a":"\u00e9"}"#,
            r#"{"a":1.50}"#,
            r#"{"a":1e3}"#,
            r#"{"a":-0}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":1,"a":2}"#,
        ] {
            assert!(!is_as_stored(raw), "{raw}");
            assert_ne!(stored(raw), raw, "the reference changes {raw}");
        }
    }

    #[test]
    fn what_the_rules_refuse_is_left_to_the_reference() {
        // Too deep (the reference names the rule), not an object, many keys, not JSON.
        let many_keys = format!(
            "{{{}}}",
            (0..=MAX_KEYS)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        for raw in [
            r#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}"#,
            r#"[1]"#,
            r#""text""#,
            many_keys.as_str(),
            r#"{"a":}"#,
            r#"{"a":1"#,
            r#"{"a":tru}"#,
            r#"{"a" 1}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
        ] {
            assert!(!is_as_stored(raw), "{raw}");
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\"\\\\/é\u{1}]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(9, 64, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(("[a-e]{1,2}", inner), 0..5)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever is recognized is exactly what the reference would store, and what
        /// the reference wrote itself is recognized unless it holds what is left to it.
        #[test]
        fn a_recognized_context_is_what_the_reference_stores(
            value in json_value(),
            pretty in any::<bool>(),
        ) {
            let context = Value::Object([("v".to_owned(), value)].into_iter().collect());
            let raw = if pretty {
                serde_json::to_string_pretty(&context).unwrap()
            } else {
                context.to_string()
            };
            if is_as_stored(&raw) {
                prop_assert_eq!(&raw, &stored(&raw));
            }
            let left_to_reference = pretty
                || raw.contains('\\')
                || depth(&context) > MAX_CONTEXT_DEPTH
                || any_number(&context, &|n| n.is_f64() || n.to_string().trim_start_matches('-').len() > MAX_DIGITS);
            if !left_to_reference {
                prop_assert!(is_as_stored(&raw));
            }
        }
    }

    fn depth(value: &Value) -> usize {
        match value {
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether a number in `value` is a float or an integer of many digits.
    fn any_number(value: &Value, left: &dyn Fn(&serde_json::Number) -> bool) -> bool {
        match value {
            Value::Number(n) => left(n),
            Value::Object(map) => map.values().any(|v| any_number(v, left)),
            Value::Array(items) => items.iter().any(|v| any_number(v, left)),
            _ => false,
        }
    }
}
