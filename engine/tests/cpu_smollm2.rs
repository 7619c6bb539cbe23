//! SmolLM2-135M-Instruct (Q4_1 GGUF) on the CPU forward against HF transformers on the same file
//! (transformers dequantises with its own code). Skips, saying why, when the GGUF is absent.

mod cpu_common;

use engine::batch::{generate_greedy, SeqStep};
use engine::cpu::CpuModel;
use engine::tokenizer::Tokenizer;
use engine::weights::WeightSet;

/// SmolLM2's logits at the chat prompt's last position are O(30); 30 layers of fp32 in a
/// different summation order and an independent dequantiser stay within 1e-3 of HF.
const SMOLLM2_LOGIT_ABS_TOLERANCE: f32 = 1e-3;

#[test]
fn smollm2_logits_and_greedy_tokens_match_hf_transformers() {
    let Some(gguf) = cpu_common::smollm2_gguf() else {
        return;
    };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cpu_common::data_dir().join("smollm2").join("golden.json"))
            .unwrap(),
    )
    .unwrap();
    let ids = |key: &str| -> Vec<u32> {
        golden[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let prompt_ids = tokenizer
        .encode(golden["chat_prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(prompt_ids, ids("chat_prompt_ids"));

    let weights = WeightSet::from_gguf(&gguf).unwrap();
    let block_size = 16;
    let greedy = ids("greedy_ids");
    let blocks = (prompt_ids.len() + greedy.len()).div_ceil(block_size);
    let mut model = CpuModel::new(&weights, blocks, block_size).unwrap();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let logits = model
        .forward(&[SeqStep {
            block_table: &table,
            context_len: 0,
            tokens: &prompt_ids,
        }])
        .unwrap();
    let mut worst = 0.0f32;
    for (id, value) in ids("last_logits_top_ids")
        .iter()
        .zip(golden["last_logits_top_values"].as_array().unwrap())
    {
        let expected = value.as_f64().unwrap() as f32;
        let actual = logits.row(0)[*id as usize];
        worst = worst.max((actual - expected).abs());
    }
    println!("SmolLM2 top-10 logits after the chat prompt: max |ours - HF| = {worst:e}");
    assert!(worst <= SMOLLM2_LOGIT_ABS_TOLERANCE, "max |diff| {worst:e}");
    assert_eq!(logits.argmax(0), ids("last_logits_top_ids")[0]);

    let mut fresh = CpuModel::new(&weights, blocks, block_size).unwrap();
    let generated = generate_greedy(&mut fresh, &prompt_ids, greedy.len(), &[]).unwrap();
    println!(
        "SmolLM2 greedy: {:?}",
        tokenizer.decode(&generated).unwrap()
    );
    assert_eq!(
        generated, greedy,
        "greedy tokens differ from HF transformers"
    );
}
