"""Hello, dragon: a few managed processes talk over a channel made through global services.

    dragon-launch examples/hello.py [NWORKERS]

The program (p_uid 1) makes a pool and a channel in it, starts NWORKERS copies of itself as workers (each
looks the channel up by name, attaches it from its descriptor and sends a greeting), receives every greeting,
joins the workers, destroys what it made and exits 0. The workers' own prints appear labelled with their
names.
"""

import sys

from dragon.channels import Channel
from dragon.globalservices import channel, pool, process


def worker(index):
    me = process.this_process()
    ch = Channel.attach(channel.query("greetings").sdesc)
    print(f"worker {index} is p_uid {me.p_uid} on node {me.node}")
    ch.send(f"hello from worker {index} (p_uid {me.p_uid})".encode())


def main(nworkers):
    mem = pool.create(4 << 20, user_name="hello-pool")
    desc = channel.create(mem.m_uid, user_name="greetings")
    ch = Channel.attach(desc.sdesc)
    workers = [
        process.create(sys.executable, None, [__file__, "worker", str(i)], user_name=f"worker{i}")
        for i in range(nworkers)
    ]
    for _ in workers:
        print(ch.recv(timeout=30).decode())
    codes = [process.join(w.p_uid, timeout=30) for w in workers]
    print(f"workers exited with {codes}")
    ch.close()
    channel.destroy(desc.c_uid)
    pool.destroy(mem.m_uid)
    return 0 if codes == [0] * nworkers else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]))
    else:
        sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4))
