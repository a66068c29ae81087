//! The events the benchmark sends and inserts: realistic in size and spread, cheap to make,
//! rendered either as the JSON a site posts or as the rows the store writes.

use usage_protocol::event::{Event, ModelName, Source, Tokens};
use uuid::Uuid;

/// Makes realistic events: a handful of models and users, mostly small token counts,
/// a quarter with cached tokens, and a ~100-byte attachment context. Cheap and
/// deterministic per client (xorshift), with fresh UUIDv4 ids as a site would make.
pub(crate) struct Generator {
    state: u64,
}

const MODELS: [&str; 6] = [
    "gpt-4o-mini",
    "gpt-4o",
    "claude-3-5-haiku-20241022",
    "claude-sonnet-4-5",
    "gemini-2.0-flash",
    "mistral-small-latest",
];
const MIMES: [&str; 4] = ["image/jpeg", "image/png", "image/webp", "image/gif"];

/// The fields of one generated event, rendered either as JSON or as a store row.
struct Sample {
    event_id: Uuid,
    user_id: u64,
    source: Source,
    model: &'static str,
    prompt: u64,
    completion: u64,
    cached: u64,
    /// Compact JSON with sorted keys, as the agent itself stores a context.
    context: String,
}

impl Generator {
    pub(crate) fn new(seed: u64) -> Generator {
        Generator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn sample(&mut self) -> Sample {
        let prompt = 50 + self.below(4000);
        let cached = if self.below(4) == 0 {
            self.below(prompt)
        } else {
            0
        };
        let width = 320 + self.below(3500);
        let context = format!(
            r#"{{"attachment_id":{},"filename":"IMG_{:04}.jpg","height":{},"mime":"{}","width":{}}}"#,
            1000 + self.below(5_000_000),
            self.below(10_000),
            width * 3 / 4,
            MIMES[self.below(MIMES.len() as u64) as usize],
            width,
        );
        Sample {
            event_id: Uuid::new_v4(),
            user_id: self.below(500),
            source: Source::ALL[self.below(4) as usize],
            model: MODELS[self.below(MODELS.len() as u64) as usize],
            prompt,
            completion: 10 + self.below(800),
            cached,
            context,
        }
    }

    fn write_json(&mut self, out: &mut String) {
        use std::fmt::Write;
        let s = self.sample();
        let _ = write!(
            out,
            r#"{{"event_id":"{}","user_id":{},"source":"{}","model":"{}","prompt_tokens":{},"completion_tokens":{},"#,
            s.event_id,
            s.user_id,
            s.source.as_str(),
            s.model,
            s.prompt,
            s.completion
        );
        if s.cached > 0 {
            let _ = write!(out, r#""cached_tokens":{},"#, s.cached);
        }
        let _ = write!(out, r#""context":{}}}"#, s.context);
    }

    pub(crate) fn next_json(&mut self) -> String {
        let mut out = String::with_capacity(320);
        self.write_json(&mut out);
        out
    }

    pub(crate) fn batch_json(&mut self, events: usize) -> String {
        let mut out = String::with_capacity(20 + 320 * events);
        out.push_str(r#"{"events":["#);
        for i in 0..events {
            if i > 0 {
                out.push(',');
            }
            self.write_json(&mut out);
        }
        out.push_str("]}");
        out
    }

    /// `events` events as JSON lines, each ending in a newline: what a log shipper is sent.
    pub(crate) fn json_lines(&mut self, events: usize) -> String {
        let mut out = String::with_capacity(320 * events);
        for _ in 0..events {
            self.write_json(&mut out);
            out.push('\n');
        }
        out
    }

    pub(crate) fn next_event(&mut self, created_at_ms: i64) -> Event {
        let s = self.sample();
        Event {
            event_id: s.event_id,
            user_id: s.user_id,
            source: s.source,
            model: ModelName::parse(s.model).expect("the benchmark's model names are valid"),
            tokens: Tokens {
                prompt: s.prompt,
                completion: s.completion,
                cached: s.cached,
                ..Tokens::default()
            },
            origin: None,
            hold_id: None,
            context: Some(s.context),
            created_at_ms,
        }
    }
}
