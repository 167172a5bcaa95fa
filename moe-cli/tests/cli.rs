//! End-to-end tests of the `moe` binary: every subcommand and format, and the errors users see.

use std::process::{Command, Output};

fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("the moe binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_and_version() {
    let o = moe(&["--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("compare"));
    let o = moe(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("moe "), "{}", stdout(&o));
}

#[test]
fn compare_table_lists_every_router() {
    let o = moe(&["compare", "--tokens", "256", "--d-model", "32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for name in moe_routers::builtin().names() {
        assert!(out.contains(&name), "{name} missing from\n{out}");
    }
    assert!(out.contains("tokens per expert"));
}

#[test]
fn compare_json_is_typed_and_consistent() {
    let o = moe(&[
        "compare",
        "--tokens",
        "300",
        "--d-model",
        "16",
        "--experts",
        "8",
        "--top-k",
        "2",
        "--routers",
        "softmax-topk",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert_eq!(v["workload"]["tokens"], 300);
    let row = &v["rows"][0];
    assert_eq!(row["router"], "softmax-topk");
    // softmax-topk keeps every assignment: 300 tokens x k = 2.
    assert_eq!(row["kept"], 600);
    let loads: Vec<u64> = row["loads"]
        .as_array()
        .expect("loads")
        .iter()
        .map(|x| x.as_u64().expect("count"))
        .collect();
    assert_eq!(loads.len(), 8);
    assert_eq!(loads.iter().sum::<u64>(), 600);
}

#[test]
fn compare_csv_and_markdown() {
    let o = moe(&[
        "compare",
        "--tokens",
        "64",
        "--d-model",
        "8",
        "--routers",
        "softmax-topk:preset=olmoe",
        "--format",
        "csv",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("router,min,max"), "{out}");
    // A label with a comma is quoted, one without is not.
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("softmax-topk:preset=olmoe,")),
        "{out}"
    );
    let o = moe(&[
        "compare",
        "--tokens",
        "64",
        "--d-model",
        "8",
        "--routers",
        "softmax-topk",
        "--format",
        "markdown",
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("| router | min |"));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for args in [
        vec!["compare", "--routers", "nope"],
        vec!["compare", "--routers", "softmax-topk:preset=gpt5"],
        vec!["compare", "--routers", "softmax-topk:bogus=1"],
        vec!["compare", "--top-k", "17"],
        vec!["compare", "--tokens", "many"],
    ] {
        let o = moe(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?}: {err}"
        );
        assert!(err.starts_with("error"), "{args:?}: {err}");
    }
    let o = moe(&["compare", "--routers", "nope"]);
    assert!(
        stderr(&o).contains("valid routers: softmax-topk"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn list_shows_routers_options_and_backends() {
    let o = moe(&["list"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("softmax-topk"));
    assert!(out.contains("preset (default none)"));
    assert!(out.contains("cpu: available"));
    let o = moe(&["list", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert!(v["routers"].as_array().is_some_and(|r| !r.is_empty()));
    assert_eq!(v["backends"][0]["name"], "cpu");
}
