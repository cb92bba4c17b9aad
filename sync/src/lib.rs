//! medmesh-sync: how nodes talk (libp2p). Work in progress.
