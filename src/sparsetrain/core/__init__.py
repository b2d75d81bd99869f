"""The concepts every method composes: masks (:mod:`.masks`), which shapes are removed (:mod:`.schemes`),
how much sparsity each layer gets (:mod:`.distributions`), which units are kept (:mod:`.scores`), what a
step costs and saves (:mod:`.accounting`), sharded tensors (:mod:`.sharding`), and the one lifecycle that a
sparsifier and a recipe share (:mod:`.lifecycle`).

Nothing here imports a method, a backend or the application: those are built on top of this package.
"""
