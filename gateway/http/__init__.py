"""The HTTP face: the aiohttp app factory, its middlewares, and thin handlers over the core."""
