"""bgrid's storage: the LMDB environment, the content-addressable store and the action
cache, built together by ``bgrid.storage.factory.build_storage``."""
