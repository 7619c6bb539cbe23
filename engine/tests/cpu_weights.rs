//! Weight loading: HF safetensors (single file and shards), GGUF (written here with candle, with
//! F32/F16/Q8_0/Q4_0/Q4_1 tensors), and the errors for bad files.

mod cpu_common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use cpu_common::*;
use engine::batch::SeqStep;
use engine::config::ModelConfig;
use engine::cpu::CpuModel;
use engine::weights::{HostTensor, WeightSet, WeightsError};
use safetensors::Dtype;

/// Writes tensors given as (dtype, shape, little-endian bytes) into a safetensors file.
fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (dtype, shape, bytes))| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

fn f32_entries(weights: &WeightSet) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    weights
        .tensors
        .iter()
        .map(|(name, t)| {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), (Dtype::F32, t.shape.clone(), bytes))
        })
        .collect()
}

/// An HF directory with the tiny config and the given tensors.
fn hf_dir_with(
    name: &str,
    tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
) -> std::path::PathBuf {
    let dir = temp_dir(name);
    std::fs::copy(
        data_dir().join("tiny").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors);
    dir
}

fn assert_same_tensors(a: &WeightSet, b: &WeightSet) {
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    for (name, tensor) in &a.tensors {
        assert_eq!(tensor, &b.tensors[name], "{name}");
    }
}

#[test]
fn hf_directory_round_trips_and_shards_load_like_one_file() {
    // The scaled-RoPE and the biased presets round-trip too (Llama `rope_scaling`, Qwen2 config).
    for preset in ["tiny-gqa-llama3", "tiny-gqa-bias"] {
        let weights = WeightSet::random(&ModelConfig::preset(preset).unwrap(), 12);
        let dir = temp_dir(&format!("hf_round_trip_{preset}"));
        weights.save_hf_dir(&dir).unwrap();
        let loaded = WeightSet::from_hf_dir(&dir).unwrap();
        assert_eq!(
            loaded.config,
            ModelConfig {
                name: format!("hf_round_trip_{preset}"),
                ..ModelConfig::preset(preset).unwrap()
            }
        );
        assert_same_tensors(&weights, &loaded);
    }
    let weights = WeightSet::random(&ModelConfig::tiny_gqa(), 11);
    let dir = temp_dir("hf_round_trip");
    weights.save_hf_dir(&dir).unwrap();
    let loaded = WeightSet::from_hf_dir(&dir).unwrap();
    assert_eq!(
        loaded.config,
        ModelConfig {
            name: "hf_round_trip".into(),
            ..ModelConfig::tiny_gqa()
        }
    );
    assert_same_tensors(&weights, &loaded);
    // `load` finds the directory from a file inside it too.
    assert_same_tensors(
        &weights,
        &WeightSet::load(&dir.join("config.json")).unwrap(),
    );

    // Two shards and an index.
    let sharded = temp_dir("hf_sharded");
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let entries = f32_entries(&weights);
    let (first, second): (BTreeMap<_, _>, BTreeMap<_, _>) = entries
        .into_iter()
        .partition(|(name, _)| name.contains("layers.0") || name.contains("embed"));
    write_safetensors(&sharded.join("model-00001-of-00002.safetensors"), &first);
    write_safetensors(&sharded.join("model-00002-of-00002.safetensors"), &second);
    let mut weight_map = serde_json::Map::new();
    for name in first.keys() {
        weight_map.insert(name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for name in second.keys() {
        weight_map.insert(name.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_same_tensors(&weights, &WeightSet::from_hf_dir(&sharded).unwrap());
}

#[test]
fn safetensors_errors_name_the_file_and_tensor() {
    let weights = load_tiny("tiny");

    let mut missing = f32_entries(&weights);
    missing.remove("model.layers.1.mlp.up_proj.weight");
    let dir = hf_dir_with("missing_tensor", &missing);
    let err = WeightSet::from_hf_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, WeightsError::MissingTensor { tensor, .. } if tensor == "model.layers.1.mlp.up_proj.weight")
    );
    let message = err.to_string();
    assert!(
        message.contains("missing_tensor/model.safetensors")
            && message.contains("model.layers.1.mlp.up_proj.weight"),
        "{message}"
    );

    let mut wrong_shape = f32_entries(&weights);
    let (_, shape, bytes) = wrong_shape
        .get_mut("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    *shape = vec![32, 128];
    let _ = bytes;
    let err = WeightSet::from_hf_dir(&hf_dir_with("wrong_shape", &wrong_shape)).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, WeightsError::WrongShape { tensor, expected, found, .. }
            if tensor == "model.layers.0.self_attn.k_proj.weight" && expected == &vec![64, 64] && found == &vec![32, 128]),
        "{message}"
    );

    let mut bad_dtype = f32_entries(&weights);
    let entry = bad_dtype.get_mut("model.norm.weight").unwrap();
    entry.0 = Dtype::I32;
    let err = WeightSet::from_hf_dir(&hf_dir_with("bad_dtype", &bad_dtype)).unwrap_err();
    assert!(
        matches!(&err, WeightsError::UnsupportedDtype { tensor, dtype, .. } if tensor == "model.norm.weight" && dtype == "I32"),
        "{err}"
    );

    let mut extra = f32_entries(&weights);
    extra.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        (Dtype::F32, vec![1], vec![0; 4]),
    );
    let err = WeightSet::from_hf_dir(&hf_dir_with("extra_tensor", &extra)).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.0.self_attn.q_proj.bias"),
        "{err}"
    );

    let mut non_finite = f32_entries(&weights);
    non_finite
        .get_mut("model.layers.1.input_layernorm.weight")
        .unwrap()
        .2[0..4]
        .copy_from_slice(&f32::NAN.to_le_bytes());
    let err = WeightSet::from_hf_dir(&hf_dir_with("non_finite", &non_finite)).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.1.input_layernorm.weight"),
        "{err}"
    );

    let corrupt = temp_dir("corrupt_safetensors");
    std::fs::copy(
        data_dir().join("tiny").join("config.json"),
        corrupt.join("config.json"),
    )
    .unwrap();
    std::fs::write(corrupt.join("model.safetensors"), b"not a safetensors file").unwrap();
    let err = WeightSet::from_hf_dir(&corrupt).unwrap_err();
    assert!(
        matches!(err, WeightsError::Parse { .. }) && err.to_string().contains("model.safetensors"),
        "{err}"
    );

    let empty = temp_dir("no_weights");
    std::fs::copy(
        data_dir().join("tiny").join("config.json"),
        empty.join("config.json"),
    )
    .unwrap();
    let err = WeightSet::from_hf_dir(&empty).unwrap_err();
    assert!(
        matches!(err, WeightsError::Io { .. }) && err.to_string().contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn config_json_errors_name_the_field() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("tiny").join("config.json")).unwrap(),
    )
    .unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "hidden_size",
            Box::new(|c| drop(c.as_object_mut().unwrap().remove("hidden_size"))),
        ),
        (
            "num_key_value_heads",
            Box::new(|c| c["num_key_value_heads"] = 3.into()),
        ),
        (
            "rope_scaling.type",
            Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})),
        ),
        (
            "rope_scaling.rope_type",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
            }),
        ),
        (
            "rope_scaling.factor",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
            }),
        ),
        (
            "rope_scaling.high_freq_factor",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 64})
            }),
        ),
        (
            "rope_scaling.original_max_position_embeddings",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": -1})
            }),
        ),
        (
            "attention_bias",
            Box::new(|c| c["attention_bias"] = true.into()),
        ),
        (
            "use_sliding_window",
            Box::new(|c| {
                c["model_type"] = "qwen2".into();
                c["use_sliding_window"] = true.into();
            }),
        ),
        (
            "model_type",
            Box::new(|c| c["model_type"] = "mistral".into()),
        ),
        ("vocab_size", Box::new(|c| c["vocab_size"] = "many".into())),
        ("hidden_act", Box::new(|c| c["hidden_act"] = "gelu".into())),
    ];
    for (field, edit) in cases {
        let mut config = base.clone();
        edit(&mut config);
        let dir = temp_dir(&format!("config_{field}"));
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        std::fs::copy(
            data_dir().join("tiny").join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        let err = WeightSet::from_hf_dir(&dir).unwrap_err();
        assert!(
            matches!(&err, WeightsError::Config { field: f, .. } if f == field)
                && err.to_string().contains("config.json"),
            "{field}: {err}"
        );
    }
    // transformers 5 layout: RoPE settings under `rope_parameters`.
    let mut v5 = base.clone();
    v5.as_object_mut().unwrap().remove("rope_theta");
    v5["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 100000.0});
    let dir = temp_dir("config_rope_parameters");
    std::fs::write(dir.join("config.json"), v5.to_string()).unwrap();
    std::fs::copy(
        data_dir().join("tiny").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        WeightSet::from_hf_dir(&dir).unwrap().config.rope_theta,
        100000.0
    );
    // Llama 3 scaling under `rope_parameters` loads; its fields are required; other types are
    // refused naming the field.
    v5["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64});
    std::fs::write(dir.join("config.json"), v5.to_string()).unwrap();
    let config = WeightSet::from_hf_dir(&dir).unwrap().config;
    assert_eq!(
        (config.rope_theta, config.rope_scaling),
        (500000.0, ModelConfig::tiny_gqa_llama3().rope_scaling)
    );
    for (key, value, field) in [
        ("factor", serde_json::Value::Null, "rope_parameters.factor"),
        ("rope_type", "longrope".into(), "rope_parameters.rope_type"),
    ] {
        let mut bad = v5.clone();
        bad["rope_parameters"][key] = value;
        std::fs::write(dir.join("config.json"), bad.to_string()).unwrap();
        let err = WeightSet::from_hf_dir(&dir).unwrap_err();
        assert!(
            matches!(&err, WeightsError::Config { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }

    let err = WeightSet::from_hf_dir(&temp_dir("no_config")).unwrap_err();
    assert!(
        matches!(err, WeightsError::Io { .. }) && err.to_string().contains("config.json"),
        "{err}"
    );
}

#[test]
fn gguf_f32_of_the_tiny_model_reproduces_the_hf_golden_logits() {
    // Name mapping, the Q/K row permutation and the llama.* metadata, end to end.
    for preset in ["tiny", "tiny-gqa"] {
        let weights = load_tiny(preset);
        let path = temp_dir(&format!("gguf_f32_{preset}")).join("model.gguf");
        write_gguf(
            &path,
            &weights,
            &llama_metadata(&weights),
            &|_| GgmlDType::F32,
            &[],
        );
        let loaded = WeightSet::from_gguf(&path).unwrap();
        assert_eq!(
            loaded.config,
            ModelConfig {
                name: preset.into(),
                rms_norm_eps: 1e-5f32 as f64,
                ..ModelConfig::preset(preset).unwrap()
            }
        );
        assert_same_tensors(&weights, &loaded);
        let golden = load_golden(preset);
        let sequence = &golden[1];
        let mut model = CpuModel::new(&loaded, 3, 16).unwrap();
        let logits = model
            .forward_every_token(&[SeqStep {
                block_table: &[0, 1, 2],
                context_len: 0,
                tokens: &sequence.tokens,
            }])
            .unwrap();
        let (ratio, abs) = compare(
            &logits.data,
            &sequence.logits.concat(),
            GOLDEN_ABS_TOLERANCE,
            GOLDEN_REL_TOLERANCE,
        );
        assert!(ratio <= 1.0, "{preset} from GGUF: max |diff| {abs:e}");
    }
}

/// Largest error allowed for one element of a 32-element block after quantising, per format.
fn block_error_bound(dtype: GgmlDType, block: &[f32]) -> f32 {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let min = block.iter().copied().fold(f32::INFINITY, f32::min);
    let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Scales are stored in f16 (relative error 2^-11), which adds up to |q| * |delta d|.
    match dtype {
        // q = round(x / d), d = amax / 127, |q| <= 127.
        GgmlDType::Q8_0 => 0.5 * amax / 127.0 + 127.0 * (amax / 127.0) * 2f32.powi(-11) + 1e-7,
        // d = -max / 8, q in -8..=7: the end opposite the largest magnitude is clamped by one step.
        GgmlDType::Q4_0 => amax / 8.0 + 8.0 * (amax / 8.0) * 2f32.powi(-11) + 1e-7,
        // d = (max - min) / 15, x = q d + min, both d and min in f16.
        GgmlDType::Q4_1 => {
            let d = (max - min) / 15.0;
            0.5 * d + 15.0 * d * 2f32.powi(-11) + min.abs() * 2f32.powi(-11) + 1e-7
        }
        GgmlDType::F16 => amax * 2f32.powi(-11) + 1e-7,
        GgmlDType::F32 => 0.0,
        other => panic!("no bound for {other:?}"),
    }
}

#[test]
fn gguf_quantised_tensors_dequantise_within_the_format_error() {
    let weights = WeightSet::random(&ModelConfig::tiny_gqa(), 5);
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        // Linear weights in the quantised type, embeddings in F16, norms in F32 (as llama.cpp does).
        let dtype_of = move |name: &str| {
            if name.ends_with("norm.weight") {
                GgmlDType::F32
            } else if name == "model.embed_tokens.weight" {
                GgmlDType::F16
            } else {
                dtype
            }
        };
        let path = temp_dir(&format!("gguf_{dtype:?}")).join("model.gguf");
        write_gguf(&path, &weights, &llama_metadata(&weights), &dtype_of, &[]);
        let loaded = WeightSet::from_gguf(&path).unwrap();
        let mut worst_error_over_bound = 0.0f32;
        let mut largest_error = 0.0f32;
        for (name, original) in &weights.tensors {
            let restored: &HostTensor = &loaded.tensors[name];
            assert_eq!(restored.shape, original.shape, "{name}");
            let cols = *original.shape.last().unwrap();
            let block_len = if cols % 32 == 0 { 32 } else { cols };
            for (at, (block, restored_block)) in original
                .data
                .chunks(block_len)
                .zip(restored.data.chunks(block_len))
                .enumerate()
            {
                let bound = block_error_bound(dtype_of(name), block);
                for (x, y) in block.iter().zip(restored_block) {
                    let error = (x - y).abs();
                    assert!(
                        error <= bound,
                        "{dtype:?} {name} block {at}: |{x} - {y}| = {error} > bound {bound}"
                    );
                    if bound > 0.0 {
                        worst_error_over_bound = worst_error_over_bound.max(error / bound);
                    }
                    if dtype_of(name) == dtype {
                        largest_error = largest_error.max(error);
                    }
                }
            }
        }
        // The values really went through the quantiser (a lossless path would show no error).
        assert!(
            largest_error > 1e-3,
            "{dtype:?}: largest error {largest_error}"
        );
        println!("{dtype:?}: worst error / bound = {worst_error_over_bound:.3}, largest error {largest_error:.4}");
        // And the model still runs.
        let mut model = CpuModel::new(&loaded, 2, 16).unwrap();
        let logits = model
            .forward(&[SeqStep {
                block_table: &[0, 1],
                context_len: 0,
                tokens: &[1, 2, 3],
            }])
            .unwrap();
        assert!(logits.data.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn gguf_without_output_weight_ties_the_embeddings() {
    let weights = load_tiny("tiny");
    let path = temp_dir("gguf_tied").join("model.gguf");
    write_gguf(
        &path,
        &weights,
        &llama_metadata(&weights),
        &|_| GgmlDType::F32,
        &["lm_head.weight"],
    );
    let loaded = WeightSet::from_gguf(&path).unwrap();
    assert!(loaded.config.tie_word_embeddings);
    assert!(!loaded.tensors.contains_key("lm_head.weight"));
    assert_eq!(
        loaded.lm_head(),
        &weights.tensors["model.embed_tokens.weight"]
    );
}

#[test]
fn gguf_errors_name_the_file_and_tensor_or_key() {
    let weights = load_tiny("tiny");
    let metadata = llama_metadata(&weights);

    let path = temp_dir("gguf_unsupported").join("model.gguf");
    let dtype_of = |name: &str| {
        if name == "model.layers.0.mlp.up_proj.weight" {
            GgmlDType::Q5_0
        } else {
            GgmlDType::F32
        }
    };
    write_gguf(&path, &weights, &metadata, &dtype_of, &[]);
    let err = WeightSet::from_gguf(&path).unwrap_err();
    assert!(
        matches!(&err, WeightsError::UnsupportedDtype { tensor, dtype, .. } if tensor == "blk.0.ffn_up.weight" && dtype == "Q5_0"),
        "{err}"
    );
    assert!(
        err.to_string().contains("gguf_unsupported/model.gguf"),
        "{err}"
    );

    let path = temp_dir("gguf_missing").join("model.gguf");
    write_gguf(
        &path,
        &weights,
        &metadata,
        &|_| GgmlDType::F32,
        &["model.layers.1.self_attn.v_proj.weight"],
    );
    let err = WeightSet::from_gguf(&path).unwrap_err();
    assert!(err.to_string().contains("blk.1.attn_v.weight"), "{err}");
    assert!(matches!(err, WeightsError::MissingTensor { .. }), "{err}");

    // Metadata that disagrees with the tensors: a wrong shape names the tensor.
    let mut wrong = metadata.clone();
    for (key, value) in wrong.iter_mut() {
        if key == "llama.feed_forward_length" {
            *value = Value::U32(128);
        }
    }
    let path = temp_dir("gguf_wrong_shape").join("model.gguf");
    write_gguf(&path, &weights, &wrong, &|_| GgmlDType::F32, &[]);
    let err = WeightSet::from_gguf(&path).unwrap_err();
    assert!(
        matches!(err, WeightsError::WrongShape { .. }) && err.to_string().contains("ffn_"),
        "{err}"
    );

    let without_heads: Vec<_> = metadata
        .iter()
        .filter(|(k, _)| k != "llama.attention.head_count")
        .cloned()
        .collect();
    let path = temp_dir("gguf_no_heads").join("model.gguf");
    write_gguf(&path, &weights, &without_heads, &|_| GgmlDType::F32, &[]);
    let err = WeightSet::from_gguf(&path).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Config { field, .. } if field == "llama.attention.head_count"),
        "{err}"
    );

    let mut other_arch = metadata.clone();
    other_arch[0].1 = Value::String("qwen2".into());
    let path = temp_dir("gguf_arch").join("model.gguf");
    write_gguf(&path, &weights, &other_arch, &|_| GgmlDType::F32, &[]);
    let err = WeightSet::from_gguf(&path).unwrap_err();
    assert!(err.to_string().contains("qwen2"), "{err}");

    let path = temp_dir("gguf_garbage").join("model.gguf");
    std::fs::write(&path, b"GGUF but not really").unwrap();
    let err = WeightSet::from_gguf(&path).unwrap_err();
    assert!(
        matches!(err, WeightsError::Parse { .. }) && err.to_string().contains("gguf_garbage"),
        "{err}"
    );

    let err = WeightSet::from_gguf(Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(
        matches!(err, WeightsError::Io { .. })
            && err.to_string().contains("/nonexistent/model.gguf"),
        "{err}"
    );
}
