//! Compile-time behaviour of `#[task]` and `canvas!`: what they accept, and where their
//! errors point.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/task/pass/*.rs");
    t.compile_fail("tests/ui/task/fail/*.rs");
    t.pass("tests/ui/canvas/pass/*.rs");
    t.compile_fail("tests/ui/canvas/fail/*.rs");
}
