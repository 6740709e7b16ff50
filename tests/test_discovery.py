"""Image discovery: recursive, any-case extensions, hidden files and the output folder skipped,
stable order, relative names with forward slashes."""

from pathlib import Path

import pytest

from wbc_batch.discovery import IMAGE_EXTENSIONS, discover_images, is_image_name, relative_name


def touch(root: Path, rel: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def names(paths, root):
    return [relative_name(p, root) for p in paths]


def test_recursive_all_extensions_any_case(tmp_path):
    for rel in ["a.jpg", "b.JPEG", "s1/c.Png", "s1/deep/d.bmp", "s2/e.TIF", "s2/f.tiff"]:
        touch(tmp_path, rel)
    touch(tmp_path, "notes.txt")
    touch(tmp_path, "s1/data.csv")
    touch(tmp_path, "s1/g.gif")
    assert names(discover_images(tmp_path), tmp_path) == [
        "a.jpg", "b.JPEG", "s1/c.Png", "s1/deep/d.bmp", "s2/e.TIF", "s2/f.tiff"]


def test_extensions_are_the_documented_ones():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff"}
    assert is_image_name("x.JpG") and not is_image_name(".x.jpg") and not is_image_name("x.gif")
    assert is_image_name("IMG_0001.JFIF")  # what Windows names many JPEGs saved from a browser


def test_images_in_formats_that_are_not_read_are_named_in_one_warning(tmp_path):
    # before: a camera set to WebP or HEIC lost its sample without a word
    for rel in ["a.jpg", "s1/b.webp", "s1/c.WEBP", "s2/d.heic", "notes.txt", "s2/e.jpg.part",
                ".f.webp"]:
        touch(tmp_path, rel)
    said, not_read = [], []
    assert names(discover_images(tmp_path, warn=said.append, not_read=not_read), tmp_path) == ["a.jpg"]
    assert said == ["left out, as formats that are not read: 1 .heic, 2 .webp (e.g. s1/b.webp); "
                    "save them as PNG, TIFF or JPEG to analyse them"]
    assert not_read == ["s1/b.webp", "s1/c.WEBP", "s2/d.heic"]  # for run.json and the Summary
    touch(tmp_path, "s3/g.png")
    said.clear()
    (tmp_path / "s1" / "b.webp").unlink(), (tmp_path / "s1" / "c.WEBP").unlink()
    (tmp_path / "s2" / "d.heic").unlink()
    discover_images(tmp_path, warn=said.append)
    assert said == []  # other files (notes, partial downloads, hidden ones) are not worth a word


def test_hidden_files_and_folders_skipped(tmp_path):
    touch(tmp_path, "ok.png")
    touch(tmp_path, ".hidden.png")
    touch(tmp_path, ".cache/x.png")
    touch(tmp_path, "s1/.report.xlsx.abc.tmp.png")  # an atomic write's temporary file
    assert names(discover_images(tmp_path), tmp_path) == ["ok.png"]


def test_nas_and_windows_system_folders_are_skipped_everywhere_images_are_searched(tmp_path):
    # a Synology share keeps resized copies of each field in @eaDir: counted as smears, the
    # sample's WBCs were counted four times over; a recycle bin became a sample of its own
    from wbc_batch.truth import iter_files
    from wbc_batch.train.datasets import read_class_folders

    for rel in ["P001/field_01.jpg", "P001/@eaDir/field_01.jpg/SYNOPHOTO_THUMB_XL.jpg",
                "P001/#recycle/old.jpg", "@Recycle/x.png", "$RECYCLE.BIN/S-1-5-21/$RAB12CD.jpg",
                "System Volume Information/y.png", "__MACOSX/P001/z.jpg", "lost+found/w.png",
                "Neutrophil/a.png", "Neutrophil/@eaDir/a.png/SYNOPHOTO_THUMB_M.png",
                "lymphocyte/b.png", "@EADIR/c.png", "lymphocyte/#Recycle/d.png"]:
        touch(tmp_path, rel)
    found = ["Neutrophil/a.png", "P001/field_01.jpg", "lymphocyte/b.png"]
    assert names(discover_images(tmp_path), tmp_path) == found
    assert names(iter_files(tmp_path, [".png", ".jpg"]), tmp_path) == found
    crops = read_class_folders(tmp_path)
    assert sorted(relative_name(c.image, tmp_path) for c in crops) == found[::2]
    # a sample folder whose name merely contains such a word is searched
    touch(tmp_path, "eaDir-notes/d.png")
    assert "eaDir-notes/d.png" in names(discover_images(tmp_path), tmp_path)


def test_output_folder_inside_input_is_excluded(tmp_path):
    touch(tmp_path, "s1/a.png")
    touch(tmp_path, "results/overlays/s1/a.png.png")
    touch(tmp_path, "results_other/b.png")
    found = discover_images(tmp_path, exclude=tmp_path / "results")
    assert names(found, tmp_path) == ["results_other/b.png", "s1/a.png"]
    # the exclusion works through a relative or differently spelled path too
    found = discover_images(tmp_path, exclude=tmp_path / "s1" / ".." / "results")
    assert "results/overlays/s1/a.png.png" not in names(found, tmp_path)


def test_folders_holding_other_results_are_skipped(tmp_path):
    # run -o in/results, then -o in/results2: the first run's overlays are not smears
    touch(tmp_path, "s1/a.png")
    touch(tmp_path, "results/overlays/s1/a.png.png")
    for name in ("run.json", "images.csv"):
        touch(tmp_path, f"results/{name}")
    touch(tmp_path, "watched/ledger.sqlite")
    touch(tmp_path, "watched/overlays/s1/a.png.png")
    touch(tmp_path, "only_json/run.json")  # a run.json alone is not our results folder
    touch(tmp_path, "only_json/b.png")
    touch(tmp_path, "s2/c.png")  # a sample that was once given as OUT (run in -o in/s2)
    touch(tmp_path, "s2/.wbc-batch-results")
    touch(tmp_path, "s2/overlays/c.png.png")
    found = discover_images(tmp_path, exclude=tmp_path / "results2")
    assert names(found, tmp_path) == ["only_json/b.png", "s1/a.png", "s2/c.png"]


def test_linked_folders_are_followed_once_and_broken_ones_named(tmp_path, caplog):
    root, share = tmp_path / "in", tmp_path / "share"
    touch(root, "A/a.png")
    touch(share, "B/b.png")
    (root / "B").symlink_to(share / "B", target_is_directory=True)
    (root / "B_again").symlink_to(share / "B", target_is_directory=True)  # one folder, two links
    (share / "B" / "loop").symlink_to(share / "B", target_is_directory=True)
    (root / "C").symlink_to(tmp_path / "unmounted", target_is_directory=True)
    assert names(discover_images(root), root) == ["A/a.png", "B/b.png"]
    assert f"link {root / 'C'} leads to {tmp_path / 'unmounted'}, which is missing" in caplog.text
    # the sample left out as a second link to one folder is named, with where it is counted
    assert (f"folder {root / 'B_again'} leads to {root / 'B'}, already searched: its images are "
            "counted once, under that name") in caplog.text


def test_a_folder_is_named_as_itself_not_as_a_link_to_it(tmp_path, caplog):
    # `latest` sorts before `patient_B`, and links deeper down are met before their targets too
    touch(tmp_path, "patient_B/a.png")
    touch(tmp_path, "x/2024/patient_C/c.png")
    (tmp_path / "latest").symlink_to(tmp_path / "patient_B", target_is_directory=True)
    (tmp_path / "a_link").symlink_to(tmp_path / "x" / "2024", target_is_directory=True)
    assert names(discover_images(tmp_path), tmp_path) == ["patient_B/a.png", "x/2024/patient_C/c.png"]
    assert f"folder {tmp_path / 'latest'} leads to {tmp_path / 'patient_B'}" in caplog.text
    assert f"folder {tmp_path / 'a_link'} leads to {tmp_path / 'x' / '2024'}" in caplog.text


def test_folders_the_search_cannot_enter_are_listed(tmp_path):
    touch(tmp_path, "s1/a.png")
    (tmp_path / "s2").symlink_to(tmp_path / "unmounted" / "s2", target_is_directory=True)
    left_out = []
    assert names(discover_images(tmp_path, left_out=left_out), tmp_path) == ["s1/a.png"]
    (tmp_path / "latest.log").symlink_to(tmp_path / "rotated.log")  # not a folder: named only
    (tmp_path / "run.2024").symlink_to(tmp_path / "unmounted" / "run.2024")
    (tmp_path / "Smith.Anna").symlink_to(tmp_path / "unmounted" / "Smith.Anna")
    assert left_out == [{"path": str(tmp_path / "s2"),
                         "reason": f"link to {tmp_path / 'unmounted' / 's2'}, which is missing"}]
    left_out = []
    discover_images(tmp_path, left_out=left_out)
    assert sorted(item["path"] for item in left_out) == [
        str(tmp_path / name) for name in ("Smith.Anna", "run.2024", "s2")]


def test_order_is_stable_and_by_relative_name(tmp_path):
    for rel in ["b/2.png", "a/10.png", "a/9.png", "B.png", "a.png"]:
        touch(tmp_path, rel)
    first = names(discover_images(tmp_path), tmp_path)
    assert first == sorted(first)
    assert first == names(discover_images(tmp_path), tmp_path)


def test_unicode_and_spaces(tmp_path):
    touch(tmp_path, "Probe Ü 1/Blut ausstrich ß.jpg")
    touch(tmp_path, "échantillon/x y.png")
    assert names(discover_images(tmp_path), tmp_path) == [
        "Probe Ü 1/Blut ausstrich ß.jpg", "échantillon/x y.png"]


def test_empty_folder(tmp_path):
    assert discover_images(tmp_path) == []


def test_relative_name_forward_slashes_and_outside(tmp_path):
    assert relative_name(tmp_path / "a" / "b.png", tmp_path) == "a/b.png"
    with pytest.raises(ValueError):
        relative_name(tmp_path.parent / "elsewhere.png", tmp_path)


def test_broken_links_are_listed_pipes_are_not_and_are_named(tmp_path):
    import os

    touch(tmp_path, "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b_link.png")
    os.symlink(tmp_path / "unmounted" / "c.png", tmp_path / "c_broken.png")
    os.mkfifo(tmp_path / "d_pipe.png")
    os.mkfifo(tmp_path / "notes.fifo")
    said = []
    assert names(discover_images(tmp_path, warn=said.append), tmp_path) == [
        "a.png", "b_link.png", "c_broken.png"]
    assert said == [f"{tmp_path / 'd_pipe.png'} is not a regular file (a pipe, socket or device): "
                    "left out"]


def test_a_folder_that_cannot_be_read_is_named(tmp_path, caplog, monkeypatch):
    import os

    touch(tmp_path, "A/a.png")
    touch(tmp_path, "B/b.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "B":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert names(discover_images(tmp_path), tmp_path) == ["A/a.png"]
    assert f"cannot read folder {tmp_path / 'B'} (Permission denied)" in caplog.text


def test_a_folder_removed_while_the_search_runs_is_no_folder_left_out(tmp_path, monkeypatch):
    # a watcher's scan met sample folders being archived, and said "cannot read folder ...
    # (No such file or directory): its images are left out" for each, in red
    import errno
    import os

    from wbc_batch import discovery

    touch(tmp_path, "s1/a.png")
    walk = os.walk

    def walk_meeting_removals(top, onerror=None, **kw):
        onerror(FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "gone")))
        onerror(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "s1")))
        yield from walk(top, onerror=onerror, **kw)

    monkeypatch.setattr(discovery.os, "walk", walk_meeting_removals)
    said, left_out = [], []
    assert names(discover_images(tmp_path, warn=said.append, left_out=left_out), tmp_path) == ["s1/a.png"]
    assert said == [f"cannot read folder {tmp_path / 's1'} (Permission denied): its images are left out"]
    assert [entry["path"] for entry in left_out] == [str(tmp_path / "s1")]
