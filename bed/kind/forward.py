"""A TCP forwarder for scripts/e2e-kind: LISTEN_HOST:PORT -> 127.0.0.1:TARGET_PORT.

The bed's AWS launcher listens on loopback only; kind's pods reach the Docker host at the kind
network's gateway address. This forwards that address (an interface of this host, reachable only
from the host's own containers) to the launcher. Prints READY once listening; SIGTERM stops it.

    python3 bed/kind/forward.py LISTEN_HOST PORT TARGET_PORT
"""

import asyncio
import signal
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(listen_host: str, port: int, target_port: int) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, target_writer), pipe(target_reader, client_writer))

    server = await asyncio.start_server(handle, listen_host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"READY {listen_host}:{port} -> 127.0.0.1:{target_port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
