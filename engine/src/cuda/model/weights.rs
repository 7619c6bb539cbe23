//! Where each weight tensor lives in the one weight buffer, and how it gets there: upload of host
//! weights (converted to fp16/bf16), seeded random generation on the GPU, and the export of the
//! weights as an HF checkpoint.

use std::io::Write;
use std::path::Path;

use cudarc::driver::result as dr;

use super::{drv, kargs, legacy_stream_done, CudaError, CudaModel};
use crate::config::{DType, ModelConfig};
use crate::weights::WeightSet;

/// Element offsets of one layer's tensors inside the weight buffer.
#[derive(Clone, Copy)]
pub(crate) struct LayerOffsets {
    pub qkv: usize,
    /// The q, k and v biases as one vector of the fused qkv width (models with q/k/v biases).
    pub qkv_bias: Option<usize>,
    pub o: usize,
    pub gate_up: usize,
    pub down: usize,
    pub input_norm: usize,
    pub post_norm: usize,
}

/// Element offsets of every tensor (q/k/v and gate/up fused), each 256-byte aligned.
pub(crate) struct WeightLayout {
    pub embed: usize,
    pub final_norm: usize,
    pub lm_head: usize,
    pub layers: Vec<LayerOffsets>,
    pub total_elems: usize,
}

impl WeightLayout {
    pub(super) fn new(config: &ModelConfig) -> WeightLayout {
        let (h, inter, hd) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim(),
        );
        let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
        let qkv_width = (nh + 2 * nkv) * hd;
        let mut weight_elems = 0usize;
        let mut take = |elems: usize| {
            let start = weight_elems;
            weight_elems += elems.div_ceil(128) * 128; // 256-byte aligned tensors
            start
        };
        let embed = take(config.vocab_size * h);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            layers.push(LayerOffsets {
                qkv: take(qkv_width * h),
                qkv_bias: config.qkv_bias.then(|| take(qkv_width)),
                o: take(h * nh * hd),
                gate_up: take(2 * inter * h),
                down: take(h * inter),
                input_norm: take(h),
                post_norm: take(h),
            });
        }
        let final_norm = take(h);
        let lm_head = if config.tie_word_embeddings {
            embed
        } else {
            take(config.vocab_size * h)
        };
        WeightLayout {
            embed,
            final_norm,
            lm_head,
            layers,
            total_elems: weight_elems,
        }
    }
}

impl CudaModel {
    /// Every HF-named tensor with its shape and element offset in the weight buffer (q/k/v and
    /// gate/up are stored fused; these are their parts).
    fn tensor_map(&self) -> Vec<(String, Vec<usize>, usize)> {
        let c = &self.config;
        let (h, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (q_rows, kv_rows) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
            self.layout.embed,
        )];
        for (i, l) in self.layout.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h], l.input_norm));
            out.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![q_rows, h],
                l.qkv,
            ));
            out.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_rows, h],
                l.qkv + q_rows * h,
            ));
            out.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_rows, h],
                l.qkv + (q_rows + kv_rows) * h,
            ));
            if let Some(bias) = l.qkv_bias {
                for (part, rows, at) in [
                    ("q", q_rows, 0),
                    ("k", kv_rows, q_rows),
                    ("v", kv_rows, q_rows + kv_rows),
                ] {
                    out.push((
                        format!("{p}.self_attn.{part}_proj.bias"),
                        vec![rows],
                        bias + at,
                    ));
                }
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q_rows], l.o));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                l.post_norm,
            ));
            out.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![inter, h],
                l.gate_up,
            ));
            out.push((
                format!("{p}.mlp.up_proj.weight"),
                vec![inter, h],
                l.gate_up + inter * h,
            ));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter], l.down));
        }
        out.push((
            "model.norm.weight".to_string(),
            vec![h],
            self.layout.final_norm,
        ));
        if !c.tie_word_embeddings {
            out.push((
                "lm_head.weight".to_string(),
                vec![c.vocab_size, h],
                self.layout.lm_head,
            ));
        }
        out
    }

    pub(super) fn upload_weights(&mut self, ws: &WeightSet) -> Result<(), CudaError> {
        for (name, shape, offset) in self.tensor_map() {
            let tensor = ws
                .get(&name)
                .ok_or_else(|| CudaError::Weights(format!("tensor `{name}` is missing")))?;
            if tensor.shape != shape {
                return Err(CudaError::Weights(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    tensor.shape
                )));
            }
            let bits: Vec<u16> = match self.options.dtype {
                DType::Bf16 => tensor
                    .data
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
                _ => tensor
                    .data
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect(),
            };
            drv(&format!("uploading `{name}`"), unsafe {
                dr::memcpy_htod_sync(self.wptr(offset), &bits)
            })?;
        }
        legacy_stream_done("uploading the weights")
    }

    pub(super) fn generate_random_weights(&mut self, seed: u64) -> Result<(), CudaError> {
        for (index, (name, shape, offset)) in self.tensor_map().into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let (scale, bias) = if name.ends_with(".bias") {
                // Uniform with std 0.5: of the order of the projection's output, as trained
                // Qwen2 biases are.
                (0.5 * 3f32.sqrt(), 0.0)
            } else if shape.len() == 1 {
                (0.1f32, 1.0f32)
            } else if name == "model.embed_tokens.weight" {
                (3f32.sqrt(), 0.0)
            } else {
                ((3.0 / shape[1] as f32).sqrt(), 0.0)
            };
            let tensor_seed = splitmix64(seed ^ splitmix64(index as u64 + 1));
            let ptr = self.wptr(offset);
            let n64 = n as u64;
            let grid = (n.div_ceil(256).min(65536 * 4)) as u32;
            self.launch(
                self.kernels.random_fill,
                (grid, 1, 1),
                (256, 1, 1),
                kargs![ptr, n64, tensor_seed, scale, bias],
            )?;
        }
        Ok(())
    }

    /// Writes the weights as an HF checkpoint (`config.json` + `model.safetensors`, fp16/bf16) so HF
    /// transformers can load exactly the weights this model runs.
    pub fn save_hf_checkpoint(&self, dir: &Path) -> Result<(), CudaError> {
        let io = |path: &Path, e: std::io::Error| CudaError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let c = &self.config;
        let dtype_name = if self.options.dtype == DType::Bf16 {
            "bfloat16"
        } else {
            "float16"
        };
        let config_json = crate::weights::hf_config_json(c, dtype_name);
        let config_path = dir.join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config_json).expect("json"),
        )
        .map_err(|e| io(&config_path, e))?;

        let st_dtype = if self.options.dtype == DType::Bf16 {
            "BF16"
        } else {
            "F16"
        };
        let tensors = self.tensor_map();
        let mut header = serde_json::Map::new();
        let mut at = 0usize;
        for (name, shape, _) in &tensors {
            let bytes = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
            );
            at += bytes;
        }
        let mut header_bytes =
            serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
        while !header_bytes.len().is_multiple_of(8) {
            header_bytes.push(b' ');
        }
        let path = dir.join("model.safetensors");
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(64 << 20, file);
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())
            .map_err(|e| io(&path, e))?;
        w.write_all(&header_bytes).map_err(|e| io(&path, e))?;
        for (name, shape, offset) in &tensors {
            let n: usize = shape.iter().product();
            let mut host = vec![0u16; n];
            drv(&format!("downloading `{name}`"), unsafe {
                dr::memcpy_dtoh_sync(&mut host, self.wptr(*offset))
            })?;
            // SAFETY: u16 slice viewed as bytes (little-endian host, as safetensors requires).
            let bytes = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, n * 2) };
            w.write_all(bytes).map_err(|e| io(&path, e))?;
        }
        w.flush().map_err(|e| io(&path, e))?;
        Ok(())
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
