//! The seed copies in `policy/tests/seeds` (used when the repository is cloned without
//! `shared/` beside it) must stay byte-identical to the originals.

use std::path::PathBuf;

#[test]
fn seed_copies_match_shared_seeds() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shared = crate_dir.join("../../shared/seeds");
    let copies = crate_dir.join("tests/seeds");
    let mut names: Vec<_> = std::fs::read_dir(&copies)
        .expect("policy/tests/seeds exists")
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "both seeds are copied: {names:?}");
    if !shared.is_dir() {
        eprintln!("no shared/seeds beside the repository; the copies are what the tests read");
        return;
    }
    for name in names {
        let copy = std::fs::read(copies.join(&name)).unwrap();
        let original = std::fs::read(shared.join(&name)).expect("the seed exists in shared/");
        assert!(copy == original, "{name:?} differs from shared/seeds");
    }
}
