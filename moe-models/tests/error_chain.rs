//! Every [`LoadError`] prints its cause once: the message is one line ending with the cause and `source()` is
//! `None`, so a report walking the chain (anyhow's `{:#}`) does not repeat it; names from files are printed with
//! control characters escaped.

use std::error::Error;
use std::path::PathBuf;

use moe_models::{Checkpoint, LoadError, MoeConfig};

/// The message as a chain-walking report prints it: each `source()` appended after `: `.
fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[test]
fn causes_are_printed_once() {
    let tmp = tempfile::tempdir().expect("dir");
    let dir = tmp.path();
    std::fs::write(dir.join("config.json"), "{oops").expect("write");
    std::fs::write(
        dir.join("bad.safetensors"),
        [8u8, 0, 0, 0, 0, 0, 0, 0, b'[', b']', 0, 0, 0, 0, 0, 0],
    )
    .expect("write");
    let errors: Vec<LoadError> = vec![
        Checkpoint::open(dir.join("absent.safetensors")).expect_err("missing"),
        Checkpoint::open(dir.join("bad.safetensors")).expect_err("bad header"),
        MoeConfig::from_file(dir.join("config.json")).expect_err("bad json"),
        LoadError::layer(
            "x.safetensors",
            "building the mixtral layer",
            moe_core::MoeError::config("k", 9, "must be <= 8"),
        ),
    ];
    for e in &errors {
        assert!(e.source().is_none(), "{e}");
        let msg = chain(e);
        assert_eq!(msg, e.to_string());
        assert!(!msg.contains('\n'), "{msg}");
    }
    assert!(
        errors[0].to_string().contains("No such file"),
        "{}",
        errors[0]
    );
    assert!(
        errors[2]
            .to_string()
            .contains("bad JSON: key must be a string"),
        "{}",
        errors[2]
    );
}

#[test]
fn names_from_files_are_escaped() {
    let e = LoadError::MissingTensor {
        file: PathBuf::from("a\nb.safetensors"),
        tensor: "gate\n\u{1b}[31mweight".into(),
    };
    let msg = e.to_string();
    assert!(!msg.contains('\n') && !msg.contains('\u{1b}'), "{msg}");
    assert!(msg.contains("gate\\n\\u{1b}[31mweight"), "{msg}");
}
