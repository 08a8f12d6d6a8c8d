//! The GGUF reader against malformed files built in memory (each must give its own typed error, never a
//! panic), a round trip of every metadata type, and facts about the two real models.

use lockstep_engine::fetch;
use lockstep_engine::gguf::{GgmlType, GgufError, GgufFile, MetaValue};

/// A tiny GGUF writer that can also write what a correct writer never would.
mod w {
    use lockstep_engine::gguf::MetaValue;

    pub fn meta_type(v: &MetaValue) -> u32 {
        v.meta_type() as u32
    }

    #[derive(Default)]
    pub struct Buf(pub Vec<u8>);

    impl Buf {
        pub fn u8(&mut self, v: u8) -> &mut Self {
            self.0.push(v);
            self
        }
        pub fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        pub fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        pub fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        pub fn pos(&self) -> u64 {
            self.0.len() as u64
        }
        /// A value without its type tag.
        pub fn value(&mut self, v: &MetaValue) -> &mut Self {
            match v {
                MetaValue::U8(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::I8(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::U16(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::I16(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::U32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::I32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::F32(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::U64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::I64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::F64(x) => self.0.extend_from_slice(&x.to_le_bytes()),
                MetaValue::Bool(x) => self.0.push(*x as u8),
                MetaValue::String(s) => {
                    self.str(s);
                }
                MetaValue::Array(a) => {
                    // Element type of an empty array: u8.
                    self.u32(a.first().map(meta_type).unwrap_or(0));
                    self.u64(a.len() as u64);
                    for x in a {
                        self.value(x);
                    }
                }
            }
            self
        }
        pub fn kv(&mut self, key: &str, v: &MetaValue) -> &mut Self {
            self.str(key).u32(meta_type(v)).value(v)
        }
    }

    pub struct Tensor {
        pub name: String,
        pub ne: Vec<u64>,
        pub ty: u32,
        /// Relative to the data section.
        pub offset: u64,
    }

    /// A well-formed file: header, metadata, tensor infos, padding, then `data`.
    pub struct File {
        pub version: u32,
        pub kvs: Vec<(String, MetaValue)>,
        pub tensors: Vec<Tensor>,
        pub alignment: u64,
        pub data: Vec<u8>,
    }

    impl File {
        pub fn new() -> File {
            File { version: 3, kvs: vec![], tensors: vec![], alignment: 32, data: vec![] }
        }
        pub fn kv(mut self, k: &str, v: MetaValue) -> File {
            self.kvs.push((k.into(), v));
            self
        }
        /// Adds a tensor whose bytes follow the previous ones (each aligned), filled with `fill`.
        pub fn tensor(mut self, name: &str, ne: &[u64], ty: u32, n_bytes: usize, fill: u8) -> File {
            let off = self.data.len().div_ceil(self.alignment as usize) * self.alignment as usize;
            self.data.resize(off, 0);
            self.data.extend(std::iter::repeat_n(fill, n_bytes));
            self.tensors.push(Tensor { name: name.into(), ne: ne.to_vec(), ty, offset: off as u64 });
            self
        }
        pub fn bytes(&self) -> Vec<u8> {
            let mut b = Buf::default();
            b.0.extend_from_slice(b"GGUF");
            b.u32(self.version).u64(self.tensors.len() as u64).u64(self.kvs.len() as u64);
            for (k, v) in &self.kvs {
                b.kv(k, v);
            }
            for t in &self.tensors {
                b.str(&t.name).u32(t.ne.len() as u32);
                for &d in &t.ne {
                    b.u64(d);
                }
                b.u32(t.ty).u64(t.offset);
            }
            let start = b.0.len().div_ceil(self.alignment as usize) * self.alignment as usize;
            b.0.resize(start, 0);
            b.0.extend_from_slice(&self.data);
            b.0
        }
    }
}

use w::{Buf, File};

const Q8_0: u32 = 8;
const F32: u32 = 0;

/// A valid file with two tensors, used as the base of many malformed ones.
fn base() -> File {
    File::new().kv("general.architecture", MetaValue::String("llama".into())).tensor("a", &[32, 2], Q8_0, 68, 1).tensor("b", &[4], F32, 16, 2)
}

fn parse(b: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(b) {
        Ok(g) => panic!("expected an error, parsed {g:?}"),
        Err(e) => e,
    }
}

/// Header only: magic, version, counts.
fn header(n_tensors: u64, n_kv: u64) -> Buf {
    let mut b = Buf::default();
    b.0.extend_from_slice(b"GGUF");
    b.u32(3).u64(n_tensors).u64(n_kv);
    b
}

#[test]
fn base_is_valid() {
    let g = GgufFile::from_bytes(base().bytes()).unwrap();
    assert_eq!(g.tensors.len(), 2);
    let a = g.tensor("a").unwrap();
    assert_eq!(a.ty, GgmlType::Q8_0);
    assert_eq!(a.n_bytes, 68);
    assert_eq!(a.offset % 32, 0);
    assert!(g.tensor_data(a).iter().all(|&x| x == 1));
    assert_eq!(g.tensor_data(g.tensor("b").unwrap()), &[2u8; 16]);
}

#[test]
fn bad_magic() {
    let mut b = base().bytes();
    b[0..4].copy_from_slice(b"GGML");
    assert!(matches!(parse(b), GgufError::BadMagic { found } if &found == b"GGML"));
    assert!(matches!(parse(b"GG".to_vec()), GgufError::BadMagic { .. }));
}

#[test]
fn unsupported_versions() {
    let mut f = base();
    f.version = 1;
    assert!(matches!(parse(f.bytes()), GgufError::UnsupportedVersion { version: 1, offset: 4, .. }));
    let mut f = base();
    f.version = 3u32.swap_bytes();
    let e = parse(f.bytes());
    assert!(matches!(e, GgufError::UnsupportedVersion { .. }));
    assert!(e.to_string().contains("big-endian"), "{e}");
    let mut f = base();
    f.version = 2;
    GgufFile::from_bytes(f.bytes()).expect("version 2 is read");
}

#[test]
fn truncation_at_every_byte_is_an_error_never_a_panic() {
    let b = base().bytes();
    // Every proper prefix up to the end of the last tensor's data must fail.
    for n in 0..b.len() {
        let e = GgufFile::from_bytes(b[..n].to_vec());
        assert!(e.is_err(), "prefix of {n} bytes parsed");
    }
    // In the middle of the first key (of a file without tensors, whose count the prefix could hold):
    // a Truncated error naming it.
    let b = File::new().kv("general.architecture", MetaValue::String("llama".into())).bytes();
    let e = parse(b[..24 + 8 + 5].to_vec());
    assert!(matches!(&e, GgufError::Truncated { what, offset: 24, .. } if what.contains("metadata key #0")), "{e}");
}

#[test]
fn absurd_tensor_count() {
    let b = header(u64::MAX, 0);
    assert!(matches!(parse(b.0), GgufError::TooManyItems { offset: 8, count: u64::MAX, .. }));
}

#[test]
fn absurd_kv_count() {
    let mut b = header(0, 1 << 40);
    b.0.extend_from_slice(&[0; 64]);
    assert!(matches!(parse(b.0), GgufError::TooManyItems { offset: 16, .. }));
}

#[test]
fn absurd_string_length() {
    let mut b = header(0, 1);
    b.u64(1 << 60).u32(4).u32(7);
    let e = parse(b.0);
    assert!(matches!(&e, GgufError::Truncated { offset: 24, needed, .. } if *needed == 1 << 60), "{e}");
}

#[test]
fn absurd_array_count() {
    let mut b = header(0, 1);
    b.str("k").u32(9).u32(4 /* u32 */).u64(1 << 50).u32(1);
    let e = parse(b.0);
    assert!(matches!(&e, GgufError::TooManyItems { count, .. } if *count == 1 << 50), "{e}");
}

#[test]
fn unknown_value_type() {
    let mut b = header(0, 1);
    b.str("k");
    let at = b.pos();
    b.u32(13).u32(0);
    assert!(matches!(parse(b.0), GgufError::UnknownValueType { ty: 13, offset, .. } if offset == at));
}

#[test]
fn unknown_array_element_type() {
    let mut b = header(0, 1);
    b.str("k").u32(9);
    let at = b.pos();
    b.u32(99).u64(0);
    assert!(matches!(parse(b.0), GgufError::UnknownValueType { ty: 99, offset, .. } if offset == at));
}

#[test]
fn invalid_bool() {
    let mut b = header(0, 1);
    b.str("flag").u32(7);
    let at = b.pos();
    b.u8(2);
    assert!(matches!(parse(b.0), GgufError::InvalidBool { value: 2, offset, .. } if offset == at));
}

#[test]
fn invalid_utf8_key() {
    let mut b = header(0, 1);
    b.u64(2);
    b.0.extend_from_slice(&[0xC3, 0x28]);
    b.u32(0).u8(0);
    assert!(matches!(parse(b.0), GgufError::InvalidUtf8 { offset: 24, .. }));
}

#[test]
fn arrays_nested_too_deep() {
    let mut v = MetaValue::U8(1);
    for _ in 0..9 {
        v = MetaValue::Array(vec![v]);
    }
    let f = File::new().kv("deep", v);
    let e = parse(f.bytes());
    assert!(matches!(e, GgufError::ArrayTooDeep { depth: 9, .. }), "{e}");
    // Eight levels are fine.
    let mut v = MetaValue::U8(1);
    for _ in 0..8 {
        v = MetaValue::Array(vec![v]);
    }
    let g = GgufFile::from_bytes(File::new().kv("deep", v.clone()).bytes()).unwrap();
    assert_eq!(g.meta("deep"), Some(&v));
}

#[test]
fn duplicate_key() {
    let f = File::new().kv("a", MetaValue::U32(1)).kv("a", MetaValue::U32(2));
    assert!(matches!(parse(f.bytes()), GgufError::DuplicateKey { key, .. } if key == "a"));
}

#[test]
fn bad_alignment() {
    for v in [MetaValue::U32(0), MetaValue::U32(48), MetaValue::String("32".into())] {
        let f = File::new().kv("general.alignment", v.clone());
        assert!(matches!(parse(f.bytes()), GgufError::BadAlignment { .. }), "{v:?}");
    }
}

#[test]
fn too_many_dims() {
    let mut f = base();
    f.tensors[0].ne = vec![32, 1, 1, 1, 2];
    assert!(matches!(parse(f.bytes()), GgufError::TooManyDims { n_dims: 5, .. }));
}

#[test]
fn shape_overflow() {
    let mut f = base();
    f.tensors[1].ne = vec![1 << 32, 1 << 32];
    assert!(matches!(parse(f.bytes()), GgufError::ShapeOverflow { .. }));
    let mut f = base();
    f.tensors[1].ne = vec![u64::MAX];
    assert!(matches!(parse(f.bytes()), GgufError::ShapeOverflow { .. }));
    // Elements fit i64 but the F32 byte size does not.
    let mut f = base();
    f.tensors[1].ne = vec![1 << 62];
    assert!(matches!(parse(f.bytes()), GgufError::ShapeOverflow { .. }));
}

#[test]
fn unknown_tensor_type() {
    for ty in [4u32, 31, 99, u32::MAX] {
        let mut f = base();
        f.tensors[0].ty = ty;
        assert!(matches!(parse(f.bytes()), GgufError::UnknownTensorType { ty: t, ref name, .. } if t == ty && name == "a"));
    }
}

#[test]
fn partial_block() {
    let mut f = base();
    f.tensors[0].ne = vec![33, 2];
    assert!(matches!(parse(f.bytes()), GgufError::PartialBlock { ne0: 33, block_size: 32, .. }));
}

#[test]
fn misaligned_offset() {
    let mut f = base();
    f.tensors[1].offset += 4;
    assert!(matches!(parse(f.bytes()), GgufError::MisalignedOffset { ref name, alignment: 32, .. } if name == "b"));
}

#[test]
fn tensor_out_of_bounds() {
    let mut f = base();
    f.tensors[1].offset = 1 << 20;
    assert!(matches!(parse(f.bytes()), GgufError::TensorOutOfBounds { ref name, .. } if name == "b"));
    // Offset near u64::MAX: start + size overflows.
    let mut f = base();
    f.tensors[1].offset = u64::MAX - 31;
    assert!(matches!(parse(f.bytes()), GgufError::TensorOutOfBounds { .. }));
    // Data cut short by one byte.
    let mut b = base().bytes();
    b.pop();
    assert!(matches!(parse(b), GgufError::TensorOutOfBounds { end, file_size, .. } if end == file_size + 1));
}

#[test]
fn duplicate_tensor_name() {
    let mut f = base();
    f.tensors[1].name = "a".into();
    assert!(matches!(parse(f.bytes()), GgufError::DuplicateTensor { ref name, .. } if name == "a"));
}

#[test]
fn truncated_tensor_info() {
    let f = base();
    let b = f.bytes();
    // Cut just after tensor "b"'s n_dims: the ne field is missing.
    let end_kv = 24 + (8 + 20 + 4 + 8 + 5);
    let after_a = end_kv + (8 + 1 + 4 + 16 + 4 + 8);
    let cut = after_a + 8 + 1 + 4;
    let e = parse(b[..cut].to_vec());
    assert!(matches!(&e, GgufError::Truncated { what, .. } if what.contains("ne[0] of tensor \"b\"")), "{e}");
}

/// Deterministic byte corruption of a valid file: any outcome but a panic is acceptable.
#[test]
fn random_corruption_never_panics() {
    let good = base().kv("arr", MetaValue::Array(vec![MetaValue::String("x".into()); 3])).bytes();
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        let _ = GgufFile::from_bytes(b);
    }
}

#[test]
fn round_trip_every_metadata_type() {
    let all = vec![
        ("u8", MetaValue::U8(200)),
        ("i8", MetaValue::I8(-100)),
        ("u16", MetaValue::U16(60000)),
        ("i16", MetaValue::I16(-30000)),
        ("u32", MetaValue::U32(4_000_000_000)),
        ("i32", MetaValue::I32(-2_000_000_000)),
        ("f32", MetaValue::F32(1e-6)),
        ("bool", MetaValue::Bool(true)),
        ("string", MetaValue::String("héllo ✓".into())),
        ("u64", MetaValue::U64(u64::MAX)),
        ("i64", MetaValue::I64(i64::MIN)),
        ("f64", MetaValue::F64(1e6)),
        ("empty", MetaValue::String(String::new())),
        ("strs", MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("<|im_start|>".into())])),
        ("ints", MetaValue::Array((0..5).map(MetaValue::I32).collect())),
        ("nested", MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::F32(0.5)]), MetaValue::Array(vec![])])),
        ("general.alignment", MetaValue::U32(64)),
    ];
    for version in [2, 3] {
        let mut f = File::new();
        f.version = version;
        f.alignment = 64;
        for (k, v) in &all {
            f = f.kv(k, v.clone());
        }
        f = f.tensor("w", &[256, 3], 12 /* Q4_K */, 3 * 144, 7).tensor("n", &[5], F32, 20, 9);
        let g = GgufFile::from_bytes(f.bytes()).unwrap();
        assert_eq!(g.version, version);
        assert_eq!(g.alignment, 64);
        assert_eq!(g.metadata, all.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<Vec<_>>());
        let t = g.tensor("w").unwrap();
        assert_eq!((t.ty, t.ne.clone(), t.n_bytes, t.n_elements()), (GgmlType::Q4_K, vec![256, 3], 432, 768));
        assert_eq!(t.offset % 64, 0);
        assert_eq!(g.tensor_data(t), &[7u8; 432][..]);
        assert_eq!(g.tensor_data(g.tensor("n").unwrap()), &[9u8; 20][..]);

        assert_eq!(g.meta_u64("u32").unwrap(), 4_000_000_000);
        assert_eq!(g.meta_u64("u8").unwrap(), 200);
        assert_eq!(g.meta_f64("f32").unwrap(), 1e-6f32 as f64);
        assert_eq!(g.meta_str("string").unwrap(), "héllo ✓");
        assert_eq!(g.meta_str_array("strs").unwrap(), vec!["a", "<|im_start|>"]);
        assert_eq!(g.meta("i64").unwrap().as_i64(), Some(i64::MIN));
        assert!(g.meta_bool("bool").unwrap());
        assert!(matches!(g.meta_u64("i8"), Err(GgufError::WrongType { .. })), "negative is not a u64");
        assert!(matches!(g.meta_str("u8"), Err(GgufError::WrongType { ref key, found: "u8", .. }) if key == "u8"));
        assert!(matches!(g.meta_u64("nope"), Err(GgufError::MissingKey { ref key }) if key == "nope"));
    }
}

#[test]
fn open_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(&e, GgufError::Io { path, .. } if path == &missing));
    let bad = dir.path().join("bad.gguf");
    let mut b = base().bytes();
    b[4] = 1;
    std::fs::write(&bad, &b).unwrap();
    let e = GgufFile::open(&bad).unwrap_err();
    assert!(e.to_string().contains("bad.gguf"), "{e}");
    assert!(matches!(e.root(), GgufError::UnsupportedVersion { version: 1, .. }));
    let good = dir.path().join("good.gguf");
    std::fs::write(&good, base().bytes()).unwrap();
    let g = GgufFile::open(&good).unwrap();
    assert_eq!(g.path(), Some(good.as_path()));
    assert_eq!(g.tensor_data(g.tensor("b").unwrap()), &[2u8; 16]);
}

#[test]
fn real_qwen() {
    let path = fetch::ensure_model("qwen2.5-coder-0.5b", false).expect("fetch qwen2.5-coder-0.5b");
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture().unwrap(), "qwen2");
    assert_eq!(g.meta_u64("qwen2.block_count").unwrap(), 24);
    assert_eq!(g.meta_u64("qwen2.embedding_length").unwrap(), 896);
    assert_eq!(g.meta_f64("qwen2.rope.freq_base").unwrap(), 1e6);
    assert_eq!(g.meta_str_array("tokenizer.ggml.tokens").unwrap().len(), 151936);
    assert_eq!(g.tensors.len(), 291);
    let mut types: Vec<&str> = g.tensors.iter().map(|t| t.ty.name()).collect();
    types.sort();
    types.dedup();
    assert_eq!(types, ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.ne, [896, 896]);
    let emb = g.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ne, [896, 151936]);
    assert_eq!(g.tensor("blk.0.attn_q.bias").unwrap().ty, GgmlType::F32);
    let end = g.tensors.iter().map(|t| t.offset + t.n_bytes).max().unwrap();
    assert_eq!(end, std::fs::metadata(&path).unwrap().len());
}

#[test]
fn real_smollm2() {
    let path = fetch::ensure_model("smollm2-135m", false).expect("fetch smollm2-135m");
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.meta_u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.meta_u64("llama.embedding_length").unwrap(), 576);
    let mut types: Vec<&str> = g.tensors.iter().map(|t| t.ty.name()).collect();
    types.sort();
    types.dedup();
    assert_eq!(types, ["F32", "Q4_1", "Q8_0"]);
}
