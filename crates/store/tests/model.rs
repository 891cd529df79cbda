//! Random operation sequences against a plain BTreeMap model of etcd's semantics, on both
//! embedded backends at once; the redb store is also reopened at the end to check nothing was
//! lost. (`etcd.rs` runs the same model against etcd.)

#[path = "support/model.rs"]
mod support;

use isthmus_store::{MemStore, RedbStore, Store, StoreOptions};
use proptest::prelude::*;
use support::{check, check_nothing_extra, step, Model, Step};

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let mem = MemStore::new();
        let redb = RedbStore::open(&path, StoreOptions::default()).unwrap();
        let mut model = Model::at(0);
        for step in &steps {
            let txn = model.txn(step);
            let expected = model.apply(&txn);
            prop_assert_eq!(
                &mem.txn(txn.clone()).await.unwrap(),
                &expected,
                "mem, {:?}",
                step
            );
            prop_assert_eq!(&redb.txn(txn).await.unwrap(), &expected, "redb, {:?}", step);
        }
        check(&mem, &model).await?;
        check_nothing_extra(&mem, &model).await?;
        check(&redb, &model).await?;
        drop(redb);
        let reopened = RedbStore::open(&path, StoreOptions::default()).unwrap();
        check(&reopened, &model).await?;
        check_nothing_extra(&reopened, &model).await
    })
}

proptest! {
    // Each case fsyncs every redb commit; 64 cases of up to 24 steps stay within seconds.
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn backends_match_the_model(steps in proptest::collection::vec(step(), 0..24)) {
        run(steps)?;
    }
}
