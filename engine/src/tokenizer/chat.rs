//! Chat prompts as HF transformers' `apply_chat_template` renders them.
//!
//! A GGUF carries its model's Jinja chat template in `tokenizer.chat_template` (llama.cpp's
//! converter copies it from `tokenizer_config.json`). It is rendered here with minijinja set up
//! like HF's environment: `trim_blocks` and `lstrip_blocks`, loop controls, the variables
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, the global
//! `raise_exception(message)`, and Python string methods (`.strip()`, `.startswith()`, ...)
//! through minijinja-contrib's pycompat. Why the stored template and not a hand-written format:
//! SmolLM2's template inserts a default system message when none is given, and the model was
//! tuned on prompts with it.
//!
//! Bounds: a template comes from a file, so rendering runs on a fuel budget (a template cannot
//! loop for ever) and its output is capped.

use std::collections::BTreeMap;

use minijinja::{Environment, Error, ErrorKind, Value};

/// The metadata key holding the template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// ChatML without a default system message: what `--chat` uses for a GGUF without a template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// minijinja instructions one render may execute. Real templates take tens to hundreds per
/// message; this allows tens of thousands of messages and stops a runaway loop within a second.
const RENDER_FUEL: u64 = 5_000_000;

/// Longest rendered prompt accepted (bytes). Far past any context a model here has.
const MAX_RENDERED_BYTES: usize = 64 << 20;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Why a chat prompt could not be rendered; `origin` says where the template came from.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct ChatTemplateError {
    pub origin: String,
    pub reason: String,
}

/// A chat template and where it came from.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    origin: String,
    stored: bool,
}

impl ChatTemplate {
    /// A template read from a file; `origin` names the file and key for error messages.
    pub fn stored(source: String, origin: String) -> Self {
        ChatTemplate {
            source,
            origin,
            stored: true,
        }
    }

    /// The built-in ChatML fallback.
    pub fn chatml() -> Self {
        ChatTemplate {
            source: CHATML_TEMPLATE.to_string(),
            origin: "the built-in ChatML template".to_string(),
            stored: false,
        }
    }

    /// True when the template came from the model file, false for the ChatML fallback.
    pub fn is_stored(&self) -> bool {
        self.stored
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` (roles and contents as given), with the assistant header when
    /// `add_generation_prompt`; `bos_token`/`eos_token` are the special tokens' text (absent:
    /// undefined in the template, as in HF when the tokenizer has none).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String, ChatTemplateError> {
        let fail = |reason: String| ChatTemplateError {
            origin: self.origin.clone(),
            reason,
        };
        let env = hf_environment().map_err(|e| fail(describe(&e)))?;
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| fail(format!("the template does not compile: {}", describe(&e))))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let mut context = BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        context.extend(bos_token.map(|t| ("bos_token", Value::from(t))));
        context.extend(eos_token.map(|t| ("eos_token", Value::from(t))));
        let rendered = template
            .render(Value::from(context))
            .map_err(|e| fail(describe(&e)))?;
        if rendered.len() > MAX_RENDERED_BYTES {
            return Err(fail(format!(
                "the rendered prompt has {} bytes, more than the {MAX_RENDERED_BYTES} accepted",
                rendered.len()
            )));
        }
        Ok(rendered)
    }
}

/// minijinja configured like HF transformers' `ImmutableSandboxedEnvironment(trim_blocks=True,
/// lstrip_blocks=True, extensions=[loopcontrols])` plus `raise_exception`.
fn hf_environment() -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    let syntax = env
        .syntax()
        .to_builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()?;
    env.set_syntax(syntax);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    Ok(env)
}

/// A minijinja error in words: the template's own `raise_exception` message as it stands, other
/// errors with their line.
fn describe(error: &Error) -> String {
    match (error.kind(), error.detail(), error.line()) {
        (ErrorKind::InvalidOperation, Some(detail), _) => {
            format!("the template refused the messages: {detail}")
        }
        (ErrorKind::OutOfFuel, _, _) => {
            "the template ran too long (a loop that does not end?)".to_string()
        }
        (_, _, Some(line)) => format!("{error} (template line {line})"),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_has_no_default_system_message() {
        let prompt = ChatTemplate::chatml()
            .render(&[ChatMessage::new("user", "Hi")], true, None, None)
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn runaway_and_refusing_templates_are_errors() {
        let looping = ChatTemplate::stored(
            "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}"
                .into(),
            "loop.gguf".into(),
        );
        let err = looping.render(&[], false, None, None).unwrap_err();
        assert!(err.to_string().starts_with("loop.gguf: "), "{err}");
        assert!(err.reason.contains("too long"), "{err}");

        let refusing = ChatTemplate::stored(
            "{{ raise_exception('Conversation roles must alternate') }}".into(),
            "refuse.gguf".into(),
        );
        let err = refusing.render(&[], false, None, None).unwrap_err();
        assert!(
            err.reason.contains("Conversation roles must alternate"),
            "{err}"
        );

        let broken = ChatTemplate::stored("{% for %}".into(), "broken.gguf".into());
        let err = broken.render(&[], false, None, None).unwrap_err();
        assert!(err.reason.contains("does not compile"), "{err}");
    }
}
