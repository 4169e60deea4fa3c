//! Trimming history to a token budget, counted with the model's own tokenizer (tiktoken's
//! encodings, as OpenAI counts them), not a characters-per-token guess.

use serde_json::Value;
use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

/// Tokens OpenAI adds per message (role and separators), and to prime the reply.
const PER_MESSAGE: usize = 3;
const REPLY_PRIMING: usize = 3;

/// The encoding of `model`; models tiktoken does not know (compatible servers' names) are
/// counted with o200k, the encoding of every current OpenAI model.
fn encoding(model: &str) -> &'static CoreBPE {
    match get_tokenizer(model) {
        Some(Tokenizer::Cl100kBase) => tiktoken_rs::cl100k_base_singleton(),
        Some(Tokenizer::P50kBase) => tiktoken_rs::p50k_base_singleton(),
        Some(Tokenizer::R50kBase | Tokenizer::Gpt2) => tiktoken_rs::r50k_base_singleton(),
        _ => tiktoken_rs::o200k_base_singleton(),
    }
}

/// Tokens one message costs: its text (string content, or the text parts of a multi-part
/// content) plus the per-message overhead. Images and audio are not counted.
pub fn message_tokens(message: &Value, model: &str) -> usize {
    let bpe = encoding(model);
    let count = |text: &str| bpe.encode_ordinary(text).len();
    let content = match &message["content"] {
        Value::String(text) => count(text),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .map(count)
            .sum(),
        _ => 0,
    };
    let role = message["role"].as_str().map(count).unwrap_or(0);
    content + role + PER_MESSAGE
}

/// Tokens a whole request's messages cost.
pub fn tokens(messages: &[Value], model: &str) -> usize {
    messages
        .iter()
        .map(|m| message_tokens(m, model))
        .sum::<usize>()
        + REPLY_PRIMING
}

/// The longest tail of `history` that fits `budget` together with `new`: the oldest messages go
/// first, a leading system message is always kept, and the kept part never starts with an
/// assistant or tool message (a reply without its question confuses models).
pub fn trim(history: &[Value], new: &[Value], model: &str, budget: usize) -> Vec<Value> {
    let (system, rest) = match history.first() {
        Some(first) if super::is_instruction(first) => (Some(first), &history[1..]),
        _ => (None, history),
    };
    let mut used = tokens(new, model) + system.map_or(0, |s| message_tokens(s, model));
    let mut start = rest.len();
    for (i, message) in rest.iter().enumerate().rev() {
        let cost = message_tokens(message, model);
        if used + cost > budget {
            break;
        }
        used += cost;
        start = i;
    }
    while start < rest.len() && matches!(rest[start]["role"].as_str(), Some("assistant" | "tool")) {
        start += 1;
    }
    system.into_iter().chain(&rest[start..]).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(role: &str, content: &str) -> Value {
        json!({"role": role, "content": content})
    }

    #[test]
    fn counts_tokens_with_the_models_encoding() {
        // "hello world" is two tokens in both cl100k and o200k; role "user" one; +3 overhead.
        assert_eq!(message_tokens(&m("user", "hello world"), "gpt-4o"), 6);
        assert_eq!(
            message_tokens(&m("user", "hello world"), "gpt-3.5-turbo"),
            6
        );
        // A text that the two encodings split differently.
        let text = "Schadenfreude über Straßenbahnhaltestellen";
        assert_ne!(
            encoding("gpt-4o").encode_ordinary(text).len(),
            encoding("gpt-4").encode_ordinary(text).len()
        );
        let parts = json!({"role": "user", "content": [
            {"type": "text", "text": "hello world"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
        ]});
        assert_eq!(message_tokens(&parts, "gpt-4o"), 6);
    }

    #[test]
    fn trims_oldest_first_and_keeps_the_system_prompt() {
        let history = vec![
            m("system", "Be brief."),
            m("user", "one"),
            m("assistant", "first answer"),
            m("user", "two"),
            m("assistant", "second answer"),
        ];
        let new = vec![m("user", "three")];
        let all = tokens(&[history.clone(), new.clone()].concat(), "gpt-4o");
        assert_eq!(
            trim(&history, &new, "gpt-4o", all),
            history,
            "everything fits"
        );
        let kept = trim(&history, &new, "gpt-4o", all - 1);
        assert_eq!(
            kept,
            vec![
                m("system", "Be brief."),
                m("user", "two"),
                m("assistant", "second answer")
            ],
            "the first turn goes, and no reply is left without its question"
        );
        let kept = trim(&history, &new, "gpt-4o", 0);
        assert_eq!(kept, vec![m("system", "Be brief.")]);
        let fits = tokens(&[history.clone(), new.clone()].concat(), "gpt-4o");
        assert!(tokens(&[kept, new].concat(), "gpt-4o") <= fits);
    }
}
