"""tfstack's config groups, shipped with the package (Hydra's search path ``pkg://tfstack.conf``).

``config.yaml`` here is the primary config where the working directory has no ``conf/`` of its
own. A project's ``conf/config.yaml`` lists ``pkg://tfstack.conf`` in ``hydra.searchpath``
(``tfstack init`` writes it so): its own options then join these groups, and an option of the
same name in the project's ``conf/`` wins (`tfstack.pipeline.conf_dirs`).
"""
