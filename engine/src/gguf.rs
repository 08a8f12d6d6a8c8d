//! The GGUF container (versions 2 and 3), read over memmap2 with every length checked.
//!
//! Layout (little-endian throughout):
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv × (key: string, value_type u32, value)
//! n_tensors × (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
//! padding to `general.alignment` (default 32)
//! data section: tensor bytes at data_start + offset (offset a multiple of the alignment)
//! ```
//! A string is `len u64` then `len` UTF-8 bytes; an array is `elem_type u32, count u64, elems`.
//!
//! Architecture invariant: the parser never allocates more than the bytes left in the file could hold
//! and never slices out of bounds; every malformed input becomes a [`GgufError`] naming the problem and
//! the byte offset where it was found. Hand-written rather than taken from a crate because the checks
//! (and their typed errors) are the point, and the format is small.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// `GGUF` as it appears in the first four bytes.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside arrays that the reader accepts (an array of scalars is depth 1).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// The ggml tensor element types (ggml.h `enum ggml_type`), with their numeric ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// ggml's super-block size for the k-quants.
pub const QK_K: usize = 256;

impl GgmlType {
    /// All known types, for iteration in tests and tools.
    pub const ALL: [GgmlType; 34] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
    ];

    /// The type for ggml's numeric id (ids 4, 5, 31–33 and 36–38 were removed from ggml).
    pub fn from_u32(v: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match v {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// ggml's numeric id.
    pub fn to_u32(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            NVFP4 => 40,
            Q1_0 => 41,
        }
    }

    /// Elements per block (1 for the plain types).
    pub fn block_size(self) -> usize {
        self.sizes().0
    }

    /// Bytes per block (gguf-py's `GGML_QUANT_SIZES`).
    pub fn type_size(self) -> usize {
        self.sizes().1
    }

    fn sizes(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
        }
    }

    /// ggml's name, e.g. `"Q4_K"`.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }

    /// The type with ggml's name (`"Q4_K"`), as [`Self::name`] writes it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Bytes taken by `n_elements` elements, or `None` when `n_elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The GGUF metadata value types (`enum gguf_type`), with their numeric ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl MetaType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use MetaType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type can occupy in a file (bounds array counts).
    fn min_size(self) -> usize {
        use MetaType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,    // the length, for an empty string
            Array => 4 + 8, // element type and count, for an empty array
        }
    }

    pub fn name(self) -> &'static str {
        use MetaType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::String(_) => MetaType::String,
            MetaValue::Array(_) => MetaType::Array,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// The type's name (`"u32"`, `"string"`, …), for error messages.
    pub fn type_name(&self) -> &'static str {
        self.meta_type().name()
    }

    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v as i64),
            MetaValue::U16(v) => Some(v as i64),
            MetaValue::U32(v) => Some(v as i64),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// F32 or F64 (f32 widened exactly), or an integer converted to f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// An array whose every element is a string.
    pub fn as_str_array(&self) -> Option<Vec<&str>> {
        self.as_array()?.iter().map(|v| v.as_str()).collect()
    }
}

/// One tensor's header entry, resolved against the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` is the contiguous dimension (for a weight, in-features), `ne[1]` the rows.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// ABSOLUTE byte offset of the tensor's first byte in the file.
    pub offset: u64,
    /// Bytes the tensor occupies (whole blocks).
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Product of `ne` (checked not to overflow when the file was read).
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Number of rows: the product of `ne[1..]`.
    pub fn n_rows(&self) -> u64 {
        self.ne.iter().skip(1).product()
    }

    /// `ne[0]`, the length of a contiguous row.
    pub fn row_len(&self) -> u64 {
        self.ne.first().copied().unwrap_or(1)
    }
}

/// Everything that can go wrong reading a GGUF file. Parse errors name the byte offset of the field
/// at fault; [`GgufFile::open`] wraps them in [`GgufError::InFile`] to name the file too.
#[derive(thiserror::Error, Debug)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<GgufError>,
    },
    #[error("not a GGUF file: magic at byte 0 is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} at byte {offset} (only versions 2 and 3 are read{hint})")]
    UnsupportedVersion { version: u32, offset: u64, hint: &'static str },
    #[error("file truncated reading {what} at byte {offset}: needs {needed} bytes, {available} left")]
    Truncated { what: String, offset: u64, needed: u64, available: u64 },
    #[error("{what} at byte {offset} declares {count} items; the {available} bytes left can hold at most {max}")]
    TooManyItems { what: String, offset: u64, count: u64, max: u64, available: u64 },
    #[error("{what}: string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("{what}: unknown metadata value type {ty} at byte {offset}")]
    UnknownValueType { what: String, ty: u32, offset: u64 },
    #[error("{what}: invalid bool byte {value} at byte {offset} (must be 0 or 1)")]
    InvalidBool { what: String, value: u8, offset: u64 },
    #[error("{what}: arrays nested {depth} deep at byte {offset} (at most {MAX_ARRAY_DEPTH} allowed)")]
    ArrayTooDeep { what: String, depth: usize, offset: u64 },
    #[error("duplicate metadata key {key:?} at byte {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("general.alignment at byte {offset} is {value}; it must be a non-zero power of two ({found_type})")]
    BadAlignment { value: u64, offset: u64, found_type: &'static str },
    #[error("tensor {name:?}: {n_dims} dimensions at byte {offset} (ggml allows at most {MAX_DIMS})")]
    TooManyDims { name: String, n_dims: u32, offset: u64 },
    #[error("tensor {name:?}: shape {ne:?} at byte {offset} overflows (element count, row count or byte size beyond i64)")]
    ShapeOverflow { name: String, ne: Vec<u64>, offset: u64 },
    #[error("tensor {name:?}: unknown ggml type {ty} at byte {offset}")]
    UnknownTensorType { name: String, ty: u32, offset: u64 },
    #[error("tensor {name:?} ({ty}): ne[0] = {ne0} at byte {offset} is not a multiple of the block size {block_size}")]
    PartialBlock { name: String, ty: GgmlType, ne0: u64, block_size: usize, offset: u64 },
    #[error("tensor {name:?}: data offset {data_offset} (field at byte {offset}) is not a multiple of the alignment {alignment}")]
    MisalignedOffset { name: String, data_offset: u64, alignment: u64, offset: u64 },
    #[error("tensor {name:?}: data bytes {start}..{end} lie outside the file ({file_size} bytes; field at byte {offset})")]
    TensorOutOfBounds { name: String, start: u64, end: u64, file_size: u64, offset: u64 },
    #[error("duplicate tensor name {name:?} at byte {offset}")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: &'static str },
}

impl GgufError {
    /// The error without the [`GgufError::InFile`] wrapper, for matching on the problem.
    pub fn root(&self) -> &GgufError {
        match self {
            GgufError::InFile { source, .. } => source.root(),
            e => e,
        }
    }
}

enum Data {
    Mmap(memmap2::Mmap),
    Vec(Vec<u8>),
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Mmap(m) => m,
            Data::Vec(v) => v,
        }
    }
}

/// A parsed GGUF file and its bytes.
pub struct GgufFile {
    pub version: u32,
    pub alignment: u64,
    /// Key–value pairs in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute byte offset of the data section.
    pub data_start: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
    data: Data,
    path: Option<PathBuf>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("size", &self.data.bytes().len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`. Parse errors come wrapped in [`GgufError::InFile`].
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and lives as long as the GgufFile. memmap2 cannot stop another
        // process from truncating or rewriting the file while it is mapped; model files in the cache are
        // written once to a temporary name and renamed into place, never modified afterwards.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut g = Self::parse(Data::Mmap(mmap)).map_err(|e| GgufError::InFile { path: path.to_path_buf(), source: Box::new(e) })?;
        g.path = Some(path.to_path_buf());
        Ok(g)
    }

    /// Parses a GGUF image held in memory (tests, generated files).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(Data::Vec(bytes))
    }

    fn parse(data: Data) -> Result<GgufFile, GgufError> {
        let h = parse_header(data.bytes())?;
        Ok(GgufFile {
            version: h.version,
            alignment: h.alignment,
            metadata: h.metadata,
            tensors: h.tensors,
            data_start: h.data_start,
            meta_index: h.meta_index,
            tensor_index: h.tensor_index,
            data,
            path: None,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_req(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.meta(key).ok_or_else(|| GgufError::MissingKey { key: key.to_string() })
    }

    fn wrong(key: &str, expected: &'static str, v: &MetaValue) -> GgufError {
        GgufError::WrongType { key: key.to_string(), expected, found: v.type_name() }
    }

    /// A string value.
    pub fn meta_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.meta_req(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, "string", v))
    }

    /// A non-negative integer of any integer type.
    pub fn meta_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.meta_req(key)?;
        v.as_u64().ok_or_else(|| Self::wrong(key, "non-negative integer", v))
    }

    /// [`Self::meta_u64`] converted to usize.
    pub fn meta_usize(&self, key: &str) -> Result<usize, GgufError> {
        let n = self.meta_u64(key)?;
        usize::try_from(n).map_err(|_| Self::wrong(key, "integer fitting usize", &MetaValue::U64(n)))
    }

    /// A float (f32 or f64) or an integer, as f64.
    pub fn meta_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.meta_req(key)?;
        v.as_f64().ok_or_else(|| Self::wrong(key, "number", v))
    }

    pub fn meta_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.meta_req(key)?;
        v.as_bool().ok_or_else(|| Self::wrong(key, "bool", v))
    }

    /// An array of values.
    pub fn meta_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        let v = self.meta_req(key)?;
        v.as_array().ok_or_else(|| Self::wrong(key, "array", v))
    }

    /// An array of strings.
    pub fn meta_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.meta_req(key)?;
        v.as_str_array().ok_or_else(|| Self::wrong(key, "array of strings", v))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.meta_str("general.architecture")
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes. Bounds were checked when the file was read; a `TensorInfo` not from this
    /// file whose range falls outside it yields an empty slice (dequantization then reports a size
    /// mismatch) rather than a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let b = self.data.bytes();
        let (Ok(start), Ok(len)) = (usize::try_from(t.offset), usize::try_from(t.n_bytes)) else {
            return &[];
        };
        start.checked_add(len).and_then(|end| b.get(start..end)).unwrap_or(&[])
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The file's path for messages (`<memory>` for [`Self::from_bytes`]).
    pub fn display_name(&self) -> String {
        self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<memory>".into())
    }
}

struct Header {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: u64,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.left() {
            return Err(GgufError::Truncated { what: what(), offset: self.pos as u64, needed: n as u64, available: self.left() as u64 });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// A count of items of at least `min_size` bytes each, checked against the bytes left.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(what)?;
        let max = (self.left() / min_size.max(1)) as u64;
        if count > max {
            return Err(GgufError::TooManyItems { what: what(), offset, count, max, available: self.left() as u64 });
        }
        Ok(count as usize) // count <= left <= usize::MAX
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let offset = self.pos as u64;
        let len = self.u64(what)?;
        if len > self.left() as u64 {
            return Err(GgufError::Truncated { what: format!("{} (string of {len} bytes)", what()), offset, needed: len, available: self.left() as u64 });
        }
        let s = self.take(len as usize, what)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(GgufError::InvalidUtf8 { what: what(), offset }),
        }
    }

    fn value(&mut self, ty: MetaType, depth: usize, what: &dyn Fn() -> String) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(self.arr::<1>(what)?[0]),
            MetaType::I8 => MetaValue::I8(self.arr::<1>(what)?[0] as i8),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.arr(what)?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.arr(what)?)),
            MetaType::U32 => MetaValue::U32(u32::from_le_bytes(self.arr(what)?)),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.arr(what)?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.arr(what)?)),
            MetaType::U64 => MetaValue::U64(u64::from_le_bytes(self.arr(what)?)),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.arr(what)?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.arr(what)?)),
            MetaType::Bool => {
                let offset = self.pos as u64;
                match self.arr::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    value => return Err(GgufError::InvalidBool { what: what(), value, offset }),
                }
            }
            MetaType::String => MetaValue::String(self.string(what)?),
            MetaType::Array => {
                let offset = self.pos as u64;
                if depth + 1 > MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep { what: what(), depth: depth + 1, offset });
                }
                let raw = self.u32(what)?;
                let elem = MetaType::from_u32(raw).ok_or_else(|| GgufError::UnknownValueType { what: what(), ty: raw, offset })?;
                let n = self.count(elem.min_size(), &|| format!("{} (array of {})", what(), elem.name()))?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(elem, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                MetaValue::Array(items)
            }
        })
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic: [u8; 4] = match c.arr(&|| "magic".into()) {
        Ok(m) => m,
        Err(_) => {
            let mut found = [0u8; 4];
            found[..buf.len().min(4)].copy_from_slice(&buf[..buf.len().min(4)]);
            return Err(GgufError::BadMagic { found });
        }
    };
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        let hint = if version == 1 {
            "; version 1 used 32-bit counts and is obsolete"
        } else if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            "; this looks like a big-endian GGUF"
        } else {
            ""
        };
        return Err(GgufError::UnsupportedVersion { version, offset: 4, hint });
    }
    // Smallest tensor info: name length (8) + n_dims (4) + type (4) + offset (8).
    let n_tensors = c.count(24, &|| "tensor count".into())?;
    // Smallest key–value pair: key length (8) + value type (4) + a one-byte value.
    let n_kv = c.count(13, &|| "metadata key-value count".into())?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut meta_index = HashMap::with_capacity(n_kv);
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..n_kv {
        let key_offset = c.pos as u64;
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty_offset = c.pos as u64;
        let raw = c.u32(&|| format!("value type of {key:?}"))?;
        let ty = MetaType::from_u32(raw).ok_or_else(|| GgufError::UnknownValueType { what: format!("metadata {key:?}"), ty: raw, offset: ty_offset })?;
        let value_offset = c.pos as u64;
        let value = c.value(ty, 0, &|| format!("metadata {key:?}"))?;
        if key == "general.alignment" {
            let a = value.as_u64().unwrap_or(0);
            if !matches!(value, MetaValue::U32(_) | MetaValue::U64(_)) || a == 0 || !a.is_power_of_two() {
                return Err(GgufError::BadAlignment { value: a, offset: value_offset, found_type: value.type_name() });
            }
            alignment = a;
        }
        if meta_index.insert(key.clone(), i).is_some() {
            return Err(GgufError::DuplicateKey { key, offset: key_offset });
        }
        metadata.push((key, value));
    }

    // Tensor infos: offsets are relative to the data section, resolved once its start is known.
    struct Raw {
        info: TensorInfo,
        rel: u64,
        rel_field: u64,
    }
    let mut raws = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name_offset = c.pos as u64;
        let name = c.string(&|| format!("name of tensor #{i}"))?;
        if tensor_index.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor { name, offset: name_offset });
        }
        let dims_offset = c.pos as u64;
        let n_dims = c.u32(&|| format!("n_dims of tensor {name:?}"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, n_dims, offset: dims_offset });
        }
        let ne_offset = c.pos as u64;
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(c.u64(&|| format!("ne[{d}] of tensor {name:?}"))?);
        }
        let ty_offset = c.pos as u64;
        let raw_ty = c.u32(&|| format!("type of tensor {name:?}"))?;
        let ty = GgmlType::from_u32(raw_ty).ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), ty: raw_ty, offset: ty_offset })?;
        // ggml keeps ne as int64_t: every dimension, the element count and the byte size must fit i64; so
        // must the row count ne[1]·ne[2]·…, which a zero ne[0] would otherwise leave unchecked.
        let product = |dims: &[u64]| {
            let fits = |n: &u64| *n <= i64::MAX as u64;
            dims.iter().try_fold(1u64, |acc, &d| if fits(&d) { acc.checked_mul(d) } else { None }).filter(fits)
        };
        let (Some(n_el), Some(_rows)) = (product(&ne), product(ne.get(1..).unwrap_or_default())) else {
            return Err(GgufError::ShapeOverflow { name, ne, offset: ne_offset });
        };
        let ne0 = ne.first().copied().unwrap_or(1);
        if ne0 % ty.block_size() as u64 != 0 {
            return Err(GgufError::PartialBlock { name, ty, ne0, block_size: ty.block_size(), offset: ne_offset });
        }
        let Some(n_bytes) = ty.bytes_for(n_el).filter(|&b| b <= i64::MAX as u64) else {
            return Err(GgufError::ShapeOverflow { name, ne, offset: ne_offset });
        };
        let rel_field = c.pos as u64;
        let rel = c.u64(&|| format!("data offset of tensor {name:?}"))?;
        if rel % alignment != 0 {
            return Err(GgufError::MisalignedOffset { name, data_offset: rel, alignment, offset: rel_field });
        }
        raws.push(Raw { info: TensorInfo { name, ne, ty, offset: 0, n_bytes }, rel, rel_field });
    }

    let file_size = buf.len() as u64;
    let header_end = c.pos as u64;
    // The data section starts at the next multiple of the alignment; a file with no tensors may end
    // before that padding.
    let data_start = align_up(header_end, alignment).unwrap_or(u64::MAX);
    let mut tensors = Vec::with_capacity(raws.len());
    for r in raws {
        let Raw { mut info, rel, rel_field } = r;
        let start = data_start.checked_add(rel);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_size => info.offset = s,
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    name: info.name,
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_size,
                    offset: rel_field,
                })
            }
        }
        tensors.push(info);
    }
    Ok(Header { version, alignment, metadata, meta_index, tensors, tensor_index, data_start })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        assert_eq!(GgmlType::Q4_K.type_size(), 144);
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q5_0.type_size(), 22);
        assert_eq!(GgmlType::Q8_0.type_size(), 34);
        assert_eq!(GgmlType::Q2_K.type_size(), 84);
        assert_eq!(GgmlType::Q3_K.type_size(), 110);
        assert_eq!(GgmlType::Q5_K.type_size(), 176);
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.to_u32()), Some(t), "{t}");
        }
        assert_eq!(GgmlType::from_u32(4), None);
        assert_eq!(GgmlType::from_name("Q5_K"), Some(GgmlType::Q5_K));
        assert_eq!(GgmlType::from_name("q5_k"), None);
    }

    #[test]
    fn empty_and_short_inputs_are_errors() {
        for n in 0..24 {
            let mut b = b"GGUF\x03\0\0\0".to_vec();
            b.resize(24, 0);
            b.truncate(n);
            assert!(GgufFile::from_bytes(b).is_err(), "{n} bytes");
        }
        let mut ok = b"GGUF\x03\0\0\0".to_vec();
        ok.resize(24, 0);
        let g = GgufFile::from_bytes(ok).unwrap();
        assert!(g.tensors.is_empty() && g.metadata.is_empty());
    }
}
