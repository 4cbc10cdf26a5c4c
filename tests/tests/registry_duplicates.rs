//! Two definitions of one task name are refused when the registry is built, naming both.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod billing {
    use stem::prelude::*;

    #[task(name = "dup.charge")]
    pub(crate) async fn charge(amount: u64) -> u64 {
        amount
    }
}

mod legacy {
    use stem::prelude::*;

    #[task(name = "dup.charge")]
    pub(crate) async fn charge(cents: u64) -> u64 {
        cents * 100
    }
}

#[test]
fn duplicate_names_from_inventory_are_an_error_naming_both_definitions() {
    let err = stem::Registry::from_inventory().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`dup.charge`"), "{msg}");
    assert!(msg.contains("registry_duplicates::billing"), "{msg}");
    assert!(msg.contains("registry_duplicates::legacy"), "{msg}");
    assert!(msg.contains("registry_duplicates.rs:"), "names files and lines: {msg}");
}

#[test]
fn duplicate_explicit_registration_is_an_error() {
    let err =
        stem::Registry::new().register::<billing::charge>().register::<legacy::charge>().build().unwrap_err();
    assert!(err.to_string().contains("dup.charge"));
}

#[test]
fn registering_the_same_task_twice_is_fine() {
    let reg =
        stem::Registry::new().register::<billing::charge>().register::<billing::charge>().build().unwrap();
    assert_eq!(reg.names(), vec!["dup.charge"]);
}
