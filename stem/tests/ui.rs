//! Compile-time behaviour of `#[task]`: what it accepts, and where its errors point.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/task/pass/*.rs");
    t.compile_fail("tests/ui/task/fail/*.rs");
}
