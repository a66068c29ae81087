//! A fake AI provider: each API's documented answer, with cached, cache-write and
//! reasoning counts where the API has them, and an error answer. Each answer has a fresh
//! response id; [`expected`] holds the numbers the plugin must record for each.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde_json::{Value, json};

/// The fake provider, served until dropped.
pub struct Provider {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Provider {
    pub async fn start() -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let counter = Arc::new(AtomicU64::new(0));
        let app = Router::new().fallback(answer).with_state(counter);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Provider { url, task }
    }
}

async fn answer(
    State(counter): State<Arc<AtomicU64>>,
    uri: Uri,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path();
    if request["model"] == "error-model" {
        // An error answer, usage and all: it must record nothing.
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({
                "error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"},
                "usage": {"prompt_tokens": 999, "completion_tokens": 999, "total_tokens": 1998}
            })),
        );
    }
    let answer = if path.starts_with("/openrouter/") {
        json!({
            "id": format!("gen-{n}"), "object": "chat.completion",
            "model": "meta-llama/llama-3.3-70b-instruct",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1000,
                      "prompt_tokens_details": {"cached_tokens": 50},
                      "completion_tokens_details": {"reasoning_tokens": 20}}
        })
    } else if path.ends_with("/chat/completions") {
        json!({
            "id": format!("chatcmpl-{n}"), "object": "chat.completion", "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
                      "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 120, "audio_tokens": 0}}
        })
    } else if path == "/v1/responses" {
        json!({
            "id": format!("resp_{n}"), "object": "response", "status": "completed",
            "model": "gpt-5-mini-2025-08-07",
            "output": [],
            "usage": {"input_tokens": 2000, "input_tokens_details": {"cached_tokens": 1500},
                      "output_tokens": 700, "output_tokens_details": {"reasoning_tokens": 512},
                      "total_tokens": 2700}
        })
    } else if path == "/v1/embeddings" {
        json!({
            "object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 64, "total_tokens": 64}
        })
    } else if path == "/v1/messages" {
        json!({
            "id": format!("msg_{n}"), "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 30, "cache_creation_input_tokens": 2000,
                      "cache_read_input_tokens": 8000, "output_tokens": 250}
        })
    } else if path.starts_with("/v1beta/models/") {
        json!({
            "candidates": [{"content": {"parts": [{"text": "ok"}], "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 200,
                              "totalTokenCount": 1500, "cachedContentTokenCount": 600,
                              "thoughtsTokenCount": 300},
            "modelVersion": "gemini-2.5-flash", "responseId": format!("gemini-{n}")
        })
    } else {
        // An API nobody listed: answered like chat, metered by no one.
        json!({
            "id": format!("other-{n}"), "model": "unlisted-model",
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
        })
    };
    (StatusCode::OK, Json(answer))
}

/// What each API's answer must record: (api, model, prompt, cached, cache write,
/// completion, reasoning), by the plugin's table.
pub fn expected() -> Vec<(&'static str, &'static str, [u64; 5])> {
    vec![
        (
            "openai_chat",
            "gpt-4o-mini-2024-07-18",
            [1200, 400, 0, 300, 120],
        ),
        (
            "openai_responses",
            "gpt-5-mini-2025-08-07",
            [2000, 1500, 0, 700, 512],
        ),
        (
            "openai_embeddings",
            "text-embedding-3-small",
            [64, 0, 0, 0, 0],
        ),
        // input 30 + cache read 8000 + cache write 2000.
        (
            "anthropic_messages",
            "claude-sonnet-4-5-20250929",
            [10_030, 8000, 2000, 250, 0],
        ),
        // candidates 200 + thoughts 300.
        ("gemini", "gemini-2.5-flash", [1000, 600, 0, 500, 300]),
        (
            "openrouter_chat",
            "meta-llama/llama-3.3-70b-instruct",
            [900, 50, 0, 100, 20],
        ),
    ]
}
