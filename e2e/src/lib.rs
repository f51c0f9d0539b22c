//! hawser end-to-end suite: scenarios written once against a cluster given by kubeconfig, with
//! a small adapter ([`backend::Backend`]) for what differs between a kind cluster and the local
//! sandbox (the fake apiserver, network-namespace nodes running the real dataplane, the real
//! operator with the mock cloud, and real traffic).

pub mod backend;
pub mod binaries;
pub mod external;
pub mod kind;
pub mod lbagent;
pub mod local;
pub mod netns;
pub mod reaper;
pub mod scenarios;
pub mod traffic;
