"""Process model: the supervisor owns the sockets and runs the workers.

(First step: a single worker in the supervisor's own process; the forking,
pinned multi-worker supervisor comes with the operations work.)
"""

from . import keys, sockets
from .log import Log
from .worker import Worker


def run(config_path, cfg, workers=None):
    log = Log(level=cfg.log.level)
    keyring = keys.load_dir(cfg.keys.dir, cfg.keys.signing_key_id)
    listeners = sockets.listener_sockets(cfg)
    internal = sockets.internal_socket(cfg, 0)
    worker = Worker(cfg, keyring, listeners, internal, log, config_path=config_path)
    worker.run()
    return 0
