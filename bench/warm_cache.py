"""Evict files from the page cache, then read them back with readahead off
(POSIX_FADV_RANDOM), so every server starts with the whole data cached in
small folios. Large folios (from big sequential writes or readahead) make
ext4 4 KiB buffered writes several times costlier, which would make results
depend on the order the servers run in."""
import os, sys
CHUNK = int(os.environ.get("WARM_CHUNK", 65536))
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    size = os.fstat(fd).st_size
    off = 0
    while off < size:
        os.pread(fd, CHUNK, off)
        off += CHUNK
    os.close(fd)
