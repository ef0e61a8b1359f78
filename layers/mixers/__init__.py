"""The sequence mixers, one equation each (the papers'): attention, windowed and block-recurrent attention, the RG-LRU, gated retention, RWKV-6 and GOLD, Aaren; their XLA forms."""
