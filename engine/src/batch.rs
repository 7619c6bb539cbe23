//! The batched paged forward shared by the CPU and CUDA backends: what one step is asked to do
//! (`SeqStep`), what it returns (`Logits`), and greedy generation on top of any backend.
//!
//! Contract (both backends): a forward over a batch of `SeqStep`s writes the KV of each sequence's
//! new tokens at positions `context_len..context_len + tokens.len()` into the blocks its
//! `block_table` names and returns the logits of each sequence's last new token. A prefill is a
//! step with many tokens, a decode step has one token, and a later turn of an agent is a prefill
//! with `context_len > 0` on top of the KV already in its blocks.

/// One sequence's part of a batched forward step.
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// Pool block ids holding this sequence's KV, in position order: position `p` lives in block
    /// `block_table[p / block_size_tokens]` at slot `p % block_size_tokens`.
    pub block_table: &'a [u32],
    /// Tokens whose KV is already in the blocks (positions `0..context_len`).
    pub context_len: usize,
    /// New tokens to run (at positions `context_len..`); at least one.
    pub tokens: &'a [u32],
}

impl SeqStep<'_> {
    /// Context length after this step.
    pub fn end_len(&self) -> usize {
        self.context_len + self.tokens.len()
    }
}

/// Row-major f32 logits, `rows x vocab`.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub rows: usize,
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, row: usize) -> &[f32] {
        &self.data[row * self.vocab..(row + 1) * self.vocab]
    }

    /// Greedy token of one row.
    pub fn argmax(&self, row: usize) -> u32 {
        greedy_token(self.row(row))
    }
}

/// Index of the largest logit; ties go to the lowest token id, NaN never wins.
pub fn greedy_token(logits: &[f32]) -> u32 {
    let mut best_index = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (index, &value) in logits.iter().enumerate() {
        if value > best_value {
            best_value = value;
            best_index = index;
        }
    }
    best_index as u32
}

/// A backend that runs the batched paged forward over its own KV block pool.
pub trait PagedModel {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs one batched step; returns the logits of each sequence's last new token
    /// (`rows == batch.len()`).
    fn forward(&mut self, batch: &[SeqStep<'_>]) -> Result<Logits, Self::Error>;

    /// Runs one batched step and returns only each sequence's greedy token (the serving path). The
    /// default reads all logits back; the CUDA backend overrides it so only the tokens leave the
    /// device, through mapped pinned memory instead of a copy engine that swaps may be using.
    fn forward_greedy(&mut self, batch: &[SeqStep<'_>]) -> Result<Vec<u32>, Self::Error> {
        let logits = self.forward(batch)?;
        Ok((0..logits.rows).map(|row| logits.argmax(row)).collect())
    }

    fn block_size_tokens(&self) -> usize;

    fn num_blocks(&self) -> usize;
}

/// Why a greedy generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError<E: std::error::Error + 'static> {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "{needed_tokens} tokens need {needed_blocks} KV blocks but the pool has {pool_blocks}"
    )]
    PoolTooSmall {
        needed_tokens: usize,
        needed_blocks: usize,
        pool_blocks: usize,
    },
    #[error(transparent)]
    Backend(#[from] E),
}

/// Greedy continuation of one prompt: prefill, then `steps` decode steps, stopping early after a
/// token in `stop_tokens` (which is returned). Uses blocks `0..` of the pool: this is a tool for
/// demos and checks, not a serving path (real runs take block tables from `sim`'s KV mechanism).
pub fn generate_greedy<M: PagedModel>(
    model: &mut M,
    prompt: &[u32],
    steps: usize,
    stop_tokens: &[u32],
) -> Result<Vec<u32>, GenerateError<M::Error>> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let block_size = model.block_size_tokens();
    // The last generated token is never fed back, so the KV holds prompt + steps - 1 tokens.
    let needed_tokens = prompt.len() + steps.saturating_sub(1);
    let needed_blocks = needed_tokens.div_ceil(block_size);
    if needed_blocks > model.num_blocks() {
        return Err(GenerateError::PoolTooSmall {
            needed_tokens,
            needed_blocks,
            pool_blocks: model.num_blocks(),
        });
    }
    let block_table: Vec<u32> = (0..needed_blocks as u32).collect();
    let mut generated = Vec::with_capacity(steps);
    let mut context_len = 0usize;
    let mut next_input: Vec<u32> = prompt.to_vec();
    for _ in 0..steps {
        let step = SeqStep {
            block_table: &block_table,
            context_len,
            tokens: &next_input,
        };
        let logits = model.forward(&[step])?;
        context_len += next_input.len();
        let token = logits.argmax(0);
        generated.push(token);
        if stop_tokens.contains(&token) {
            break;
        }
        next_input = vec![token];
    }
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_token_prefers_lowest_id_on_ties_and_ignores_nan() {
        assert_eq!(greedy_token(&[1.0, 3.0, 3.0, -2.0]), 1);
        assert_eq!(greedy_token(&[f32::NAN, -1.0, f32::NAN]), 1);
    }
}
