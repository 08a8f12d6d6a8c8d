//! The C ABI as a C engine sees it: compiles capi/tests/c/record.c with `cc` against
//! capi/include/lockstep.h and liblockstep_capi.so (built by cargo with this test, the package being a
//! cdylib too), runs it, and reads the dump it wrote back with the safetensors crate.
//!
//! A C compiler is part of the test machine (Debian's gcc): without one this test fails, it does not skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::{Dtype, SafeTensors};

/// capi/: beside this crate's Cargo.toml, or `capi/` under the working directory (a test binary run
/// from the root of a copied checkout, as ci/gpu-tests' run script does).
fn capi_dir() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("include/lockstep.h").is_file() {
        return built;
    }
    let here = PathBuf::from("capi");
    assert!(here.join("include/lockstep.h").is_file(), "capi/include/lockstep.h is neither in {} nor under the working directory", built.display());
    here
}

/// The directory holding the cdylib of this build: cargo builds the library with every crate type
/// before the tests, into target/{profile}/deps, beside this test binary (a carried copy of the test
/// binary finds it when the .so is copied beside it too).
fn cdylib_dir() -> PathBuf {
    let name = format!("{}lockstep_capi{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("target/{profile}/deps").to_path_buf();
    let profile_dir = deps.parent().expect("target/{profile}").to_path_buf();
    for dir in [&deps, &profile_dir] {
        if dir.join(&name).is_file() {
            return dir.clone();
        }
    }
    // Not there. Outside a cargo target directory (a carried copy of the test binary) nothing can be
    // built: say what to copy. Inside one, build it into the same target dir.
    assert!(
        deps.file_name().is_some_and(|n| n == "deps"),
        "{name} is not beside the test binary in {}: copy target/release/{name} there (capi/README.md)",
        deps.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-p", "lockstep-capi", "--lib"]).env("CARGO_TARGET_DIR", profile_dir.parent().expect("target/"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{name} is not beside the test binary in {} and `{cargo} build -p lockstep-capi` could not start ({e}): build it, or copy it there",
            deps.display()
        )
    });
    assert!(st.success(), "`{cargo} build -p lockstep-capi` failed ({st})");
    assert!(profile_dir.join(&name).is_file(), "{name} still missing from {} after cargo build", profile_dir.display());
    profile_dir
}

/// Compiles record.c into `out_dir`, linked to the cdylib in `lib_dir`.
fn compile_record(lib_dir: &Path, out_dir: &Path) -> PathBuf {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let src = capi_dir().join("tests/c/record.c");
    let include = capi_dir().join("include");
    let exe = out_dir.join("record");
    let out = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o"])
        .arg(&exe)
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg(format!("-L{}", lib_dir.display()))
        .arg("-llockstep_capi")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C compiler `{cc}` ({e}): the C ABI test compiles {} and needs a C compiler (Debian: apt-get install gcc; or set CC)",
                src.display()
            )
        });
    assert!(out.status.success(), "`{cc}` failed to compile {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr));
    exe
}

fn f32s(st: &SafeTensors, key: &str, shape: &[usize]) -> Vec<f32> {
    let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{key}");
    assert_eq!(t.shape(), shape, "{key}");
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn a_c_program_records_taps_and_tokens_through_the_c_abi() {
    let lib_dir = cdylib_dir();
    let work = tempfile::tempdir().unwrap();
    let exe = compile_record(&lib_dir, work.path());
    let dump = work.path().join("dump.safetensors");
    let missing = work.path().join("no-such-dir/x.safetensors");
    let out = Command::new(&exe).arg(&dump).arg(&missing).env("LD_LIBRARY_PATH", &lib_dir).output().expect("running record");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "record.c failed ({}):\nstdout:\n{stdout}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().last() == Some("record.c: ok"), "{stdout}");

    // Each bad call failed with its own message, naming the problem.
    let errors: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("expected error: ")).collect();
    assert_eq!(errors.len(), 12, "{stdout}");
    let expect = [
        missing.to_str().unwrap(),
        "path is NULL",
        "lockstep_dump_close: the dump handle is NULL",
        "s2/embd): rank 5 > 4",
        "unknown dtype 7",
        "data is NULL",
        "tap is NULL",
        "bad key \"s2/embd\"",
        "tensor \"s0/embd\" recorded twice",
        "lockstep_dump_record: the dump handle is NULL",
        "ids[1] = -7 is negative",
        "tensor \"tokens\" recorded twice",
        "dump.safetensors",
    ];
    let coded: Vec<&&str> = errors.iter().filter(|l| !l.starts_with("open ")).collect();
    assert_eq!(coded.len(), 10, "{stdout}");
    assert!(coded.iter().all(|l| l.starts_with("1 ")), "bad arguments return LOCKSTEP_EINVAL (1):\n{stdout}");
    for e in expect {
        assert!(errors.iter().any(|l| l.contains(e)), "no error message contains {e:?}:\n{stdout}");
    }

    let bytes = std::fs::read(&dump).unwrap_or_else(|e| panic!("{}: {e}", dump.display()));
    let st = SafeTensors::deserialize(&bytes).expect("a valid safetensors file");
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["s0/Qcur-0.rope", "s0/embd", "s0/kq-0", "s1/embd", "s1/l_out-0", "s1/result_norm", "tokens"]);

    let embd: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    assert_eq!(f32s(&st, "s0/embd", &[1, 1, 3, 4]), embd);
    assert_eq!(f32s(&st, "s1/embd", &[1, 1, 3, 4]), embd);
    // f16 bit patterns decoded by hand: 0x2E66 = 2^-4 * (1 + 614/1024), 0x0001 = 2^-24
    let q = f32s(&st, "s0/Qcur-0.rope", &[1, 3, 2, 2]);
    assert_eq!(q, [1.0, -2.0, 0.5, 65504.0, 5.960_464_5e-8, -0.0, 0.099_975_586, 3.0, 1.0, 1.0, -1.0, 0.0]);
    assert!(q[5].is_sign_negative(), "f16 -0 stays -0");
    assert_eq!(f32s(&st, "s0/kq-0", &[1, 2, 3, 3]), [1.0, -1.5, 3.140625].repeat(6));
    assert_eq!(f32s(&st, "s1/l_out-0", &[1, 1, 1, 4]), [0.1f64 as f32, -3.5, 1e-3f64 as f32, 7.0e-40f64 as f32]);
    assert_eq!(f32s(&st, "s1/result_norm", &[1, 1, 1, 1]), [42.0]);
    let t = st.tensor("tokens").unwrap();
    assert_eq!((t.dtype(), t.shape()), (Dtype::I32, &[3usize][..]));
    let ids: Vec<i32> = t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(ids, [9707, 11, 1879]);

    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.ends_with(".tmp")), "no temporary file left behind: {left:?}");
}
