//! The share bench's generated project is the same bytes on every run (its digest is
//! printed with the table, so tables from different runs compare).

#[allow(dead_code)]
#[path = "../benches/shares/tree.rs"]
mod tree;

use tree::Shape;

#[test]
fn the_bench_tree_is_deterministic() {
    let shape = Shape {
        large: [1 << 20, 1 << 20, 1 << 20],
        seq_bytes: 1 << 20,
        ..Shape::BENCH
    };
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ta = tree::generate(a.path(), shape).unwrap();
    let tb = tree::generate(b.path(), shape).unwrap();
    assert!(ta.files > 12_000, "{} files", ta.files);
    assert_eq!((ta.files, ta.bytes), (tb.files, tb.bytes));
    let da = tree::digest(a.path()).unwrap();
    assert_eq!(da, tree::digest(b.path()).unwrap());
    // And the digest sees a change (it is not a constant).
    std::fs::write(a.path().join("crate0/src/mod00/part0/file0.rs"), "x").unwrap();
    assert_ne!(da, tree::digest(a.path()).unwrap());
}
