// An empty group has nothing to run.

fn main() {
    let _ = stem::canvas!(group[]);
}
