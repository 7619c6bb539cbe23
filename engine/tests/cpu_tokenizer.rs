//! The byte-level BPE tokenizer on hand-made vocabularies, and on SmolLM2's when the GGUF is here.

mod cpu_common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use engine::tokenizer::{gpt2_byte_to_char, PreTokenizer, Tokenizer, TokenizerError};

/// A vocabulary of the 256 byte tokens (ids 0..=255 in byte order), then the merge products in
/// merge order, then the special tokens.
fn hand_made(merges: &[(&str, &str)], specials: &[&str], pre: PreTokenizer) -> Tokenizer {
    let byte_chars = gpt2_byte_to_char();
    let mut tokens: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
    }
    let first_special = tokens.len() as u32;
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let special_ids: Vec<u32> = (first_special..tokens.len() as u32).collect();
    let merges = merges
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    Tokenizer::new(
        tokens,
        merges,
        &special_ids,
        pre,
        None,
        special_ids.first().copied(),
    )
    .unwrap()
}

const MERGES: [(&str, &str); 8] = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("Ġwor", "ld"),
];

#[test]
fn merges_apply_by_rank_and_fall_back_to_bytes() {
    let tokenizer = hand_made(&MERGES, &["<|end|>"], PreTokenizer::Gpt2);
    let id = |token: &str| tokenizer.token_id(token).unwrap();
    assert_eq!(tokenizer.encode("hello").unwrap(), vec![id("hello")]);
    // "ld" is no merge, so " world" stops at "Ġwor" + "l" + "d".
    assert_eq!(
        tokenizer.encode(" world").unwrap(),
        vec![id("Ġwor"), id("l"), id("d")]
    );
    assert_eq!(
        tokenizer.encode("hello world!").unwrap(),
        vec![id("hello"), id("Ġwor"), id("l"), id("d"), id("!")]
    );
    // Bytes of a non-ASCII character map to their byte tokens.
    assert_eq!(tokenizer.encode("é").unwrap(), vec![0xC3, 0xA9]);
    // Pre-tokens never merge across their boundary: "o" and "r" are separate words here.
    assert_eq!(
        tokenizer.encode("o r").unwrap(),
        vec![id("o"), id("Ġ"), id("r")]
    );

    // Rank decides: with ("b","c") ranked before ("a","b"), "abc" is "a" + "bc".
    let by_rank = hand_made(&[("b", "c"), ("a", "b")], &[], PreTokenizer::Gpt2);
    assert_eq!(by_rank.encode("abc").unwrap(), vec![u32::from(b'a'), 256]);
    let other_rank = hand_made(&[("a", "b"), ("b", "c")], &[], PreTokenizer::Gpt2);
    assert_eq!(
        other_rank.encode("abc").unwrap(),
        vec![256, u32::from(b'c')]
    );
}

#[test]
fn special_tokens_are_cut_out_and_decode_round_trips() {
    let tokenizer = hand_made(&MERGES, &["<|end|>", "<|end|>x"], PreTokenizer::Gpt2);
    let end = tokenizer.special_token_id("<|end|>").unwrap();
    let end_x = tokenizer.special_token_id("<|end|>x").unwrap();
    let ids = tokenizer.encode("hello<|end|> world<|end|>x").unwrap();
    assert_eq!(ids[1], end);
    assert_eq!(
        *ids.last().unwrap(),
        end_x,
        "the longest special token wins"
    );
    assert_eq!(tokenizer.eos_token_id, Some(end));
    for text in [
        "hello<|end|> world<|end|>x",
        "plain ascii, with punctuation!?",
        "naïve café 東京 🚀\n\ttabs  and   spaces  ",
        "",
        "line1\n\n\nline2 123 4567",
    ] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    assert!(matches!(
        tokenizer.decode(&[100_000]),
        Err(TokenizerError::UnknownId { id: 100_000, .. })
    ));
}

#[test]
fn individual_digits_change_only_digit_runs() {
    let merges = [("1", "2"), ("12", "3")];
    let plain = hand_made(&merges, &[], PreTokenizer::Gpt2);
    let digits = hand_made(&merges, &[], PreTokenizer::Gpt2IndividualDigits);
    assert_eq!(plain.encode("123").unwrap(), vec![257]);
    assert_eq!(
        digits.encode("123").unwrap(),
        vec![u32::from(b'1'), u32::from(b'2'), u32::from(b'3')]
    );
    assert_eq!(plain.encode("abc").unwrap(), digits.encode("abc").unwrap());
}

fn metadata(tokens: &[&str], merges: &[&str]) -> HashMap<String, Value> {
    let strings =
        |items: &[&str]| Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect());
    HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("smollm".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
        ("tokenizer.ggml.merges".to_string(), strings(merges)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(0)),
    ])
}

#[test]
fn gguf_metadata_builds_the_tokenizer_or_names_the_bad_key() {
    let path = Path::new("hand-made.gguf");
    let tokens = ["<|eos|>", "a", "b", "ab", "Ġ", "Ġab"];
    let tokenizer =
        Tokenizer::from_gguf_metadata(&metadata(&tokens, &["a b", "Ġ ab"]), path).unwrap();
    assert_eq!(tokenizer.encode("ab ab<|eos|>").unwrap(), vec![3, 5, 0]);
    assert_eq!(tokenizer.eos_token_id, Some(0));

    let mut sentencepiece = metadata(&tokens, &["a b"]);
    sentencepiece.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    let err = Tokenizer::from_gguf_metadata(&sentencepiece, path).unwrap_err();
    assert!(
        err.to_string().contains("tokenizer.ggml.model")
            && err.to_string().contains("hand-made.gguf"),
        "{err}"
    );

    let mut no_merges = metadata(&tokens, &["a b"]);
    no_merges.remove("tokenizer.ggml.merges");
    let err = Tokenizer::from_gguf_metadata(&no_merges, path).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let err = Tokenizer::from_gguf_metadata(&metadata(&tokens, &["ab"]), path).unwrap_err();
    assert!(err.to_string().contains("entry 0"), "{err}");

    let mut unknown_pre = metadata(&tokens, &["a b"]);
    unknown_pre.insert(
        "tokenizer.ggml.pre".into(),
        Value::String("llama-bpe".into()),
    );
    let err = Tokenizer::from_gguf_metadata(&unknown_pre, path).unwrap_err();
    assert!(err.to_string().contains("llama-bpe"), "{err}");
}

#[test]
fn smollm2_tokenizer_matches_hf_transformers() {
    let Some(gguf) = cpu_common::smollm2_gguf() else {
        return;
    };
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cpu_common::data_dir().join("smollm2").join("golden.json"))
            .unwrap(),
    )
    .unwrap();
    for case in golden["encodings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, expected, "token ids of {text:?}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(
        tokenizer.special_token_id("<|im_end|>"),
        tokenizer.eos_token_id
    );
}
