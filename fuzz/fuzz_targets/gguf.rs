//! The GGUF reader (engine/src/gguf.rs) on arbitrary bytes, and what reads a parsed file next: every
//! metadata accessor, the model configuration, the tokenizer's metadata and each tensor's dequantization.
//! Any outcome but a panic, an abort or a runaway allocation is a pass; a malformed file must be an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockstep_engine::config::ModelConfig;
use lockstep_engine::dequant;
use lockstep_engine::gguf::GgufFile;
use lockstep_engine::tokenizer::VocabSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes(data.to_vec()) else { return };
    let _ = g.architecture();
    for (key, value) in &g.metadata {
        let _ = (g.meta_str(key), g.meta_u64(key), g.meta_usize(key), g.meta_f64(key), g.meta_bool(key), g.meta_array(key), g.meta_str_array(key));
        let _ = (value.as_i64(), value.as_f64(), value.type_name());
    }
    let _ = ModelConfig::from_gguf(&g);
    let _ = VocabSpec::from_gguf(&g);
    for t in &g.tensors {
        assert!(g.tensor(&t.name).is_some(), "tensor {:?} listed but not found by name", t.name);
        let bytes = g.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.n_bytes, "tensor {:?}: data slice length differs from its size", t.name);
        let _ = (t.n_rows(), t.row_len());
        if dequant::is_supported(t.ty) {
            let _ = dequant::dequantize(t.ty, bytes, t.n_elements() as usize);
        }
    }
});
