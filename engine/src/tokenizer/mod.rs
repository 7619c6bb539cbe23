//! Byte-level BPE (GPT-2 style), built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Encoding: special tokens (GGUF token types control = 3 and user-defined = 4, e.g.
//! `<|im_start|>`) are cut out of the text first and map to their ids; the rest is split into
//! pre-tokens by the GPT-2 pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` (written out by
//! hand, since the `regex` crate has no look-ahead), optionally after cutting every digit into a
//! piece of its own (llama.cpp's `smollm`/`starcoder` pre-tokenizers, HF's `Digits` with
//! `individual_digits`); each pre-token's UTF-8 bytes are mapped to GPT-2's printable byte
//! alphabet and merged pairwise by merge rank, lowest rank first.
//!
//! Chat prompts (`chat.rs`): the GGUF's `tokenizer.chat_template` rendered like HF transformers'
//! `apply_chat_template`, with plain ChatML for files that carry none.
//!
//! Approximation: `\p{L}` is taken as Rust's `char::is_alphabetic` (the Alphabetic property, which
//! also holds some combining marks) and `\p{N}` as `char::is_numeric`; the two differ only on rare
//! scripts.

mod chat;

pub use chat::{ChatMessage, ChatTemplate, ChatTemplateError, CHATML_TEMPLATE, CHAT_TEMPLATE_KEY};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;

/// How text is cut into pre-tokens before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// The GPT-2 pattern alone.
    Gpt2,
    /// Every digit on its own first, then the GPT-2 pattern (SmolLM2, StarCoder).
    Gpt2IndividualDigits,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF file could not be opened or its header read.
    #[error(transparent)]
    File(#[from] crate::weights::WeightsError),
    #[error("{path}: tokenizer metadata `{key}`: {reason}")]
    Metadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("tokenizer: {0}")]
    Invalid(String),
    #[error("{origin}: tokenizer: byte {byte:#04x} has no token in the vocabulary")]
    MissingByteToken { origin: String, byte: u8 },
    #[error("tokenizer: token id {id} is outside the vocabulary of {vocab_size}")]
    UnknownId { id: u32, vocab_size: usize },
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
}

/// A byte-level BPE tokenizer.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    tokens: Vec<String>,
    token_ids: HashMap<String, u32>,
    merge_ranks: HashMap<(String, String), u32>,
    /// Special tokens matched verbatim in the text, longest first.
    special_tokens: Vec<(String, u32)>,
    is_special: Vec<bool>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    pre_tokenizer: PreTokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The model's own chat template, when its file carries one.
    pub chat_template: Option<ChatTemplate>,
    /// The file the vocabulary came from, for errors found while encoding.
    origin: String,
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order (so the space 0x20 is 'Ġ' U+0120).
pub fn gpt2_byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    for byte in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&byte)
            || (0xA1..=0xAC).contains(&byte)
            || (0xAE..=0xFF).contains(&byte);
        table[byte as usize] = if printable {
            byte as char
        } else {
            let c = char::from_u32(256 + next_extra).expect("U+0100..U+0143 are chars");
            next_extra += 1;
            c
        };
    }
    table
}

impl Tokenizer {
    /// Builds a tokenizer from its vocabulary (token strings in the byte alphabet, index = id),
    /// its merges (pairs, rank = index) and the ids of special tokens.
    pub fn new(
        tokens: Vec<String>,
        merges: Vec<(String, String)>,
        special_ids: &[u32],
        pre_tokenizer: PreTokenizer,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
    ) -> Result<Tokenizer, TokenizerError> {
        if tokens.is_empty() {
            return Err(TokenizerError::Invalid("the vocabulary is empty".into()));
        }
        let mut token_ids = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            // Duplicates keep the first id, as llama.cpp and HF do.
            token_ids.entry(token.clone()).or_insert(id as u32);
        }
        let vocab_size = tokens.len();
        for id in [bos_token_id, eos_token_id]
            .into_iter()
            .flatten()
            .chain(special_ids.iter().copied())
        {
            if id as usize >= vocab_size {
                return Err(TokenizerError::UnknownId { id, vocab_size });
            }
        }
        let mut merge_ranks = HashMap::with_capacity(merges.len());
        for (rank, pair) in merges.into_iter().enumerate() {
            merge_ranks.entry(pair).or_insert(rank as u32);
        }
        let mut is_special = vec![false; vocab_size];
        let mut special_tokens = Vec::new();
        for &id in special_ids {
            is_special[id as usize] = true;
            if !tokens[id as usize].is_empty() {
                special_tokens.push((tokens[id as usize].clone(), id));
            }
        }
        special_tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let byte_to_char = gpt2_byte_to_char();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(byte, c)| (*c, byte as u8))
            .collect();
        Ok(Tokenizer {
            tokens,
            token_ids,
            merge_ranks,
            special_tokens,
            is_special,
            byte_to_char,
            char_to_byte,
            pre_tokenizer,
            bos_token_id,
            eos_token_id,
            chat_template: None,
            origin: "the tokenizer".to_string(),
        })
    }

    /// Reads `tokenizer.ggml.*` from a GGUF file.
    pub fn from_gguf(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let content = crate::weights::gguf_metadata(path)?;
        Self::from_gguf_metadata(&content.metadata, path)
    }

    /// Builds the tokenizer from GGUF metadata; `path` names the file in errors.
    pub fn from_gguf_metadata(
        metadata: &HashMap<String, Value>,
        path: &Path,
    ) -> Result<Tokenizer, TokenizerError> {
        let error = |key: &str, reason: String| TokenizerError::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let string_of = |key: &str| -> Result<Option<&String>, TokenizerError> {
            match metadata.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(error(key, format!("expected a string, found {other:?}"))),
            }
        };
        let model = string_of("tokenizer.ggml.model")?
            .ok_or_else(|| error("tokenizer.ggml.model", "missing".into()))?;
        if model != "gpt2" {
            return Err(error(
                "tokenizer.ggml.model",
                format!("only byte-level BPE (\"gpt2\") is supported, found \"{model}\""),
            ));
        }
        let pre_tokenizer = match string_of("tokenizer.ggml.pre")?.map(String::as_str) {
            None | Some("default") | Some("gpt2") | Some("gpt-2") => PreTokenizer::Gpt2,
            Some("smollm") | Some("starcoder") | Some("refact") => PreTokenizer::Gpt2IndividualDigits,
            Some(other) => {
                return Err(error(
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer \"{other}\" is not supported (gpt2, smollm, starcoder, refact are)"),
                ))
            }
        };
        let array_of = |key: &str| -> Result<&Vec<Value>, TokenizerError> {
            match metadata.get(key) {
                Some(Value::Array(values)) => Ok(values),
                Some(other) => Err(error(
                    key,
                    format!("expected an array, found {:?}", other.value_type()),
                )),
                None => Err(error(key, "missing".into())),
            }
        };
        let tokens = array_of("tokenizer.ggml.tokens")?
            .iter()
            .enumerate()
            .map(|(id, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(error(
                    "tokenizer.ggml.tokens",
                    format!("entry {id} is not a string: {other:?}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let merges = array_of("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(rank, v)| match v {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        error(
                            "tokenizer.ggml.merges",
                            format!("entry {rank} \"{s}\" is not \"left right\""),
                        )
                    }),
                other => Err(error(
                    "tokenizer.ggml.merges",
                    format!("entry {rank} is not a string: {other:?}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut special_ids = Vec::new();
        if let Some(types) = metadata.get("tokenizer.ggml.token_type") {
            let types = match types {
                Value::Array(types) => types,
                other => {
                    return Err(error(
                        "tokenizer.ggml.token_type",
                        format!("expected an array, found {other:?}"),
                    ))
                }
            };
            if types.len() != tokens.len() {
                return Err(error(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", types.len(), tokens.len()),
                ));
            }
            for (id, token_type) in types.iter().enumerate() {
                let token_type = match token_type {
                    Value::I32(t) => *t as i64,
                    Value::U32(t) => *t as i64,
                    other => {
                        return Err(error(
                            "tokenizer.ggml.token_type",
                            format!("entry {id}: {other:?}"),
                        ))
                    }
                };
                // 3 = control, 4 = user-defined (llama.cpp's llama_token_type).
                if token_type == 3 || token_type == 4 {
                    special_ids.push(id as u32);
                }
            }
        }
        let id_of = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match metadata.get(key) {
                None => Ok(None),
                Some(Value::U32(id)) if (*id as usize) < tokens.len() => Ok(Some(*id)),
                Some(Value::I32(id)) if *id >= 0 && (*id as usize) < tokens.len() => {
                    Ok(Some(*id as u32))
                }
                Some(other) => Err(error(
                    key,
                    format!(
                        "expected a token id below {}, found {other:?}",
                        tokens.len()
                    ),
                )),
            }
        };
        let bos = id_of("tokenizer.ggml.bos_token_id")?;
        let eos = id_of("tokenizer.ggml.eos_token_id")?;
        let chat_template = string_of(CHAT_TEMPLATE_KEY)?.map(|source| {
            let origin = format!("{}: metadata `{CHAT_TEMPLATE_KEY}`", path.display());
            ChatTemplate::stored(source.clone(), origin)
        });
        let mut tokenizer = Tokenizer::new(tokens, merges, &special_ids, pre_tokenizer, bos, eos)
            .map_err(|e| error("tokenizer.ggml.tokens", e.to_string()))?;
        tokenizer.origin = path.display().to_string();
        tokenizer.chat_template = chat_template;
        Ok(tokenizer)
    }

    /// The template `apply_chat_template` uses: the model's own, else plain ChatML.
    pub fn effective_chat_template(&self) -> ChatTemplate {
        self.chat_template
            .clone()
            .unwrap_or_else(ChatTemplate::chatml)
    }

    /// The prompt text of a conversation, as HF transformers' `apply_chat_template(messages,
    /// add_generation_prompt=...)` renders it (see `chat.rs`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let text = |id: Option<u32>| {
            id.and_then(|id| self.tokens.get(id as usize))
                .map(String::as_str)
        };
        Ok(self.effective_chat_template().render(
            messages,
            add_generation_prompt,
            text(self.bos_token_id),
            text(self.eos_token_id),
        )?)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token string (in the byte alphabet, e.g. "Ġthe"), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.token_ids.get(token).copied()
    }

    /// The id of a special token written as text (e.g. "<|im_end|>").
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        self.special_tokens
            .iter()
            .find(|(t, _)| t == text)
            .map(|(_, id)| *id)
    }

    /// Encodes text; special tokens written in the text become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token in the rest of the text (longest wins at equal start).
            let next_special = self
                .special_tokens
                .iter()
                .filter_map(|(token, id)| {
                    rest.find(token.as_str()).map(|at| (at, token.len(), *id))
                })
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            match next_special {
                Some((at, len, id)) => {
                    self.encode_ordinary(&rest[..at], &mut ids)?;
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_ordinary(rest, &mut ids)?;
                    rest = "";
                }
            }
        }
        Ok(ids)
    }

    /// Encodes text without looking for special tokens.
    fn encode_ordinary(&self, text: &str, ids: &mut Vec<u32>) -> Result<(), TokenizerError> {
        for piece in pre_tokenize(text, self.pre_tokenizer) {
            self.encode_piece(piece, ids)?;
        }
        Ok(())
    }

    fn encode_piece(&self, piece: &str, ids: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mapped: String = piece
            .bytes()
            .map(|b| self.byte_to_char[b as usize])
            .collect();
        // No whole-word shortcut: a word in the vocabulary that its merges cannot build is still
        // split (HF and llama.cpp skip merges only for `ignore_merges` vocabularies, e.g. Llama 3).
        let mut symbols: Vec<String> = mapped.chars().map(String::from).collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(at, pair)| {
                    self.merge_ranks
                        .get(&(pair[0].clone(), pair[1].clone()))
                        .map(|rank| (*rank, at))
                })
                .min();
            let Some((rank, _)) = best else { break };
            // Merge every occurrence of the best pair, left to right (GPT-2's rule).
            let mut merged = Vec::with_capacity(symbols.len());
            let mut at = 0;
            while at < symbols.len() {
                if at + 1 < symbols.len()
                    && self
                        .merge_ranks
                        .get(&(symbols[at].clone(), symbols[at + 1].clone()))
                        == Some(&rank)
                {
                    merged.push(format!("{}{}", symbols[at], symbols[at + 1]));
                    at += 2;
                } else {
                    merged.push(symbols[at].clone());
                    at += 1;
                }
            }
            symbols = merged;
        }
        for symbol in symbols {
            match self.token_ids.get(&symbol) {
                Some(&id) => ids.push(id),
                // A merge product missing from the vocabulary: fall back to its bytes.
                None => {
                    for c in symbol.chars() {
                        let byte = self.char_to_byte[&c];
                        let id = self.token_ids.get(&c.to_string()).ok_or_else(|| {
                            TokenizerError::MissingByteToken {
                                origin: self.origin.clone(),
                                byte,
                            }
                        })?;
                        ids.push(*id);
                    }
                }
            }
        }
        Ok(())
    }

    /// Decodes ids to text; special tokens are written as their text, invalid UTF-8 (a token
    /// sequence cut inside a character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::new();
        for &id in ids {
            let token = self
                .tokens
                .get(id as usize)
                .ok_or(TokenizerError::UnknownId {
                    id,
                    vocab_size: self.tokens.len(),
                })?;
            if self.is_special[id as usize] {
                bytes.extend_from_slice(token.as_bytes());
                continue;
            }
            for c in token.chars() {
                match self.char_to_byte.get(&c) {
                    Some(byte) => bytes.push(*byte),
                    None => {
                        let mut buffer = [0u8; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
                    }
                }
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Cuts text into pre-tokens (see the module doc).
pub fn pre_tokenize(text: &str, pre_tokenizer: PreTokenizer) -> Vec<&str> {
    let mut pieces = Vec::new();
    match pre_tokenizer {
        PreTokenizer::Gpt2 => gpt2_split(text, &mut pieces),
        PreTokenizer::Gpt2IndividualDigits => {
            let mut start = 0;
            for (at, c) in text.char_indices() {
                if c.is_numeric() {
                    gpt2_split(&text[start..at], &mut pieces);
                    pieces.push(&text[at..at + c.len_utf8()]);
                    start = at + c.len_utf8();
                }
            }
            gpt2_split(&text[start..], &mut pieces);
        }
    }
    pieces
}

fn is_letter(c: char) -> bool {
    c.is_alphabetic()
}

fn is_number(c: char) -> bool {
    c.is_numeric()
}

fn is_other(c: char) -> bool {
    !c.is_whitespace() && !is_letter(c) && !is_number(c)
}

/// The GPT-2 pattern, alternative by alternative, leftmost-first like a regex engine.
fn gpt2_split<'a>(text: &'a str, pieces: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let byte_at = |i: usize| {
        if i < chars.len() {
            chars[i].0
        } else {
            text.len()
        }
    };
    let run_end = |from: usize, predicate: fn(char) -> bool| {
        let mut end = from;
        while end < chars.len() && predicate(chars[end].1) {
            end += 1;
        }
        end
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i].1;
        // 's 't 're 've 'm 'll 'd
        if c == '\'' {
            let next: String = chars[i + 1..chars.len().min(i + 3)]
                .iter()
                .map(|(_, c)| *c)
                .collect();
            let len = if next.starts_with("re") || next.starts_with("ve") || next.starts_with("ll")
            {
                3
            } else if next.starts_with('s')
                || next.starts_with('t')
                || next.starts_with('m')
                || next.starts_with('d')
            {
                2
            } else {
                0
            };
            if len > 0 {
                pieces.push(&text[byte_at(i)..byte_at(i + len)]);
                i += len;
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let body = if c == ' ' { i + 1 } else { i };
        if body < chars.len() {
            let class: Option<fn(char) -> bool> =
                [is_letter as fn(char) -> bool, is_number, is_other]
                    .into_iter()
                    .find(|predicate| predicate(chars[body].1));
            if let Some(predicate) = class {
                let end = run_end(body, predicate);
                pieces.push(&text[byte_at(i)..byte_at(end)]);
                i = end;
                continue;
            }
        }
        // `\s+(?!\S)` then `\s+`: a whitespace run leaves its last char to the next word.
        if c.is_whitespace() {
            let end = run_end(i, char::is_whitespace);
            let end = if end < chars.len() && end - i > 1 {
                end - 1
            } else {
                end
            };
            pieces.push(&text[byte_at(i)..byte_at(end)]);
            i = end;
            continue;
        }
        unreachable!("every char is a letter, number, other or whitespace");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection_with_gpt2_space() {
        let table = gpt2_byte_to_char();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        let mut sorted: Vec<char> = table.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn gpt2_pattern_splits_like_the_regex() {
        let split = |text| pre_tokenize(text, PreTokenizer::Gpt2);
        assert_eq!(split("Hello world!"), vec!["Hello", " world", "!"]);
        assert_eq!(
            split("I'm here, don't"),
            vec!["I", "'m", " here", ",", " don", "'t"]
        );
        assert_eq!(split("a  b"), vec!["a", " ", " b"]);
        assert_eq!(split("x\n\ny "), vec!["x", "\n", "\n", "y", " "]);
        assert_eq!(split("abc123 45"), vec!["abc", "123", " 45"]);
        assert_eq!(split(" ...'x"), vec![" ...'", "x"]);
        assert_eq!(split("\t a"), vec!["\t", " a"]);
        assert_eq!(split("héllo wörld"), vec!["héllo", " wörld"]);
    }

    #[test]
    fn individual_digits_are_cut_first() {
        let split = |text| pre_tokenize(text, PreTokenizer::Gpt2IndividualDigits);
        assert_eq!(
            split("year 2024!"),
            vec!["year", " ", "2", "0", "2", "4", "!"]
        );
    }
}
