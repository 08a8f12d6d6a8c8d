//! Taps: the one observer interface through which intermediate tensors leave a backend.
//!
//! Names follow llama.cpp's graph callback names (`embd`, `attn_norm-0`, `Qcur-0`, …, `l_out-23`,
//! `result_norm`, `result_output`) with the stage distinction of golden/README.md: a name that occurs
//! more than once in one step gets `.{op}` (`Qcur-0.mul_mat`, `Qcur-0.add`, `Qcur-0.rope`), and where
//! the (name, op) pair still repeats, `.{op}.{k}` with k counting from 0 in graph order
//! (`norm-0.rms_norm.0` before attention, `norm-0.rms_norm.1` before the FFN).
//!
//! Shapes are ggml's `ne` reversed, always 4 long: `[ne3, ne2, ne1, ne0]`, so a `[tokens, hidden]`
//! activation is `[1, 1, tokens, hidden]` and attention scores are `[1, heads, tokens, kv_len]`.
//!
//! A backend calls [`TapSink::wants`] before doing any work for a tap, so a tap nobody asked for costs
//! one virtual call, and a forward pass given `None` for its sink costs nothing.

/// What the engine knows about one tapped tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapInfo<'a> {
    /// The key inside a step, e.g. `Qcur-0.rope` (no `s{step}/` prefix: the caller knows the step).
    pub key: &'a str,
    /// The layer, or `None` for tensors outside the layer stack (`embd`, `result_output`, …).
    pub layer: Option<usize>,
    /// `[ne3, ne2, ne1, ne0]`, row-major: the last index varies fastest.
    pub shape: [usize; 4],
}

/// Receives intermediate tensors from a backend.
pub trait TapSink {
    /// Whether the sink wants the tensor under `key`. Called before the backend copies anything.
    fn wants(&self, key: &str) -> bool;
    /// Receives one tensor, row-major f32 in `info.shape`.
    fn tap(&mut self, info: TapInfo<'_>, data: &[f32]);
    /// Layer-isolated mode: a sink may hand back a replacement for a layer's output (`l_out-L`),
    /// which the backend then feeds to layer L+1 instead of its own. Default: no replacement.
    fn replace(&mut self, _info: TapInfo<'_>) -> Option<Vec<f32>> {
        None
    }
}

/// Builds a tap key from a base name and a layer, e.g. `("Qcur", Some(3), Some("rope"))` → `Qcur-3.rope`.
pub fn key(name: &str, layer: Option<usize>, stage: Option<&str>) -> String {
    let mut k = match layer {
        Some(l) => format!("{name}-{l}"),
        None => name.to_string(),
    };
    if let Some(s) = stage {
        k.push('.');
        k.push_str(s);
    }
    k
}

/// The shape of an activation of `rows` tokens × `width`: `[1, 1, rows, width]`.
pub fn act(rows: usize, width: usize) -> [usize; 4] {
    [1, 1, rows, width]
}

/// Layer-isolated mode, for backends: asks `sink` for a replacement of `l_out-{layer}` and checks
/// that it holds exactly `shape`'s values.
pub fn layer_output_replacement(sink: &mut dyn TapSink, layer: usize, shape: [usize; 4]) -> anyhow::Result<Option<Vec<f32>>> {
    let k = key("l_out", Some(layer), None);
    let r = sink.replace(TapInfo { key: &k, layer: Some(layer), shape });
    if let Some(v) = &r {
        let n: usize = shape.iter().product();
        anyhow::ensure!(v.len() == n, "replacement for {k} has {} values, expected {n} ({shape:?})", v.len());
    }
    Ok(r)
}

/// A sink that keeps every tensor it is offered (or those matching a filter), in arrival order.
#[derive(Default)]
pub struct Recorder {
    /// Keep only keys for which this returns true; `None` keeps everything.
    pub filter: Option<Box<dyn Fn(&str) -> bool + Send>>,
    pub tensors: Vec<Tapped>,
}

/// One recorded tap.
#[derive(Debug, Clone, PartialEq)]
pub struct Tapped {
    pub key: String,
    pub layer: Option<usize>,
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self, key: &str) -> Option<&Tapped> {
        self.tensors.iter().find(|t| t.key == key)
    }
}

impl TapSink for Recorder {
    fn wants(&self, key: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f(key))
    }
    fn tap(&mut self, info: TapInfo<'_>, data: &[f32]) {
        self.tensors.push(Tapped { key: info.key.to_string(), layer: info.layer, shape: info.shape, data: data.to_vec() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_golden_scheme() {
        assert_eq!(key("Qcur", Some(3), Some("rope")), "Qcur-3.rope");
        assert_eq!(key("l_out", Some(0), None), "l_out-0");
        assert_eq!(key("result_output", None, None), "result_output");
    }

    #[test]
    fn recorder_honours_its_filter() {
        let mut r = Recorder { filter: Some(Box::new(|k: &str| k.starts_with("l_out"))), ..Default::default() };
        assert!(r.wants("l_out-1"));
        assert!(!r.wants("kq-1"));
        r.tap(TapInfo { key: "l_out-1", layer: Some(1), shape: [1, 1, 1, 2] }, &[1.0, 2.0]);
        assert_eq!(r.get("l_out-1").unwrap().data, vec![1.0, 2.0]);
    }
}
