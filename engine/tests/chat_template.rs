//! Chat templates rendered in Rust (minijinja) against Python jinja2 renders made the way HF
//! transformers' `apply_chat_template` makes them (`engine/scripts/chat_golden.py`): SmolLM2's
//! template (stored as text, no GGUF needed) and one exercising HF's conventions.

mod cpu_common;

use cpu_common::data_dir;
use engine::tokenizer::{ChatMessage, ChatTemplate};

#[test]
fn templates_render_byte_for_byte_like_jinja2() {
    let dir = data_dir().join("chat");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let bos = golden["bos_token"].as_str().unwrap();
    let eos = golden["eos_token"].as_str().unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    for case in cases {
        let file = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(dir.join(file)).unwrap();
        let template = ChatTemplate::stored(source, file.to_string());
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let what = format!(
            "{file} / {} / add_generation_prompt={add_generation_prompt}",
            case["messages_name"]
        );
        let result = template.render(&messages, add_generation_prompt, Some(bos), Some(eos));
        match (case["rendered"].as_str(), case["error"].as_str(), result) {
            (Some(expected), _, Ok(rendered)) => assert_eq!(rendered, expected, "{what}"),
            (None, Some(expected), Err(err)) => {
                assert!(err.reason.contains(expected), "{what}: {err} vs {expected}");
                assert!(err.to_string().starts_with(file), "{what}: {err}");
            }
            (_, _, result) => panic!("{what}: jinja2 gave {case}, we gave {result:?}"),
        }
    }
}

#[test]
fn smollm2_template_adds_its_default_system_message_only_when_none_is_given() {
    let source =
        std::fs::read_to_string(data_dir().join("chat/smollm2-135m-instruct.jinja")).unwrap();
    let template = ChatTemplate::stored(source, "smollm2".into());
    let user = ChatMessage::new("user", "Hi");
    let default = template
        .render(std::slice::from_ref(&user), true, None, None)
        .unwrap();
    assert!(default.starts_with(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    ));
    let own = template
        .render(
            &[ChatMessage::new("system", "Be brief."), user],
            true,
            None,
            None,
        )
        .unwrap();
    assert_eq!(
        own,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}
